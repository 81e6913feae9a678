"""Check that a change of code changes no result: run every notebook in the smoke profile at two commits
and compare what each results.json measured (metrics and the arms of every claim), notebook by notebook.

    .venv/bin/python scripts/compare_smoke.py --before 977f581 --after HEAD
    .venv/bin/python scripts/compare_smoke.py --before-runs /tmp/a/smoke --after-runs /tmp/b/smoke

Each commit is checked out into a temporary git worktree and run with this repository's environment
(its `pretrain_nb` put first on PYTHONPATH), offline, sharing this repository's data cache. Notebooks
renamed between the commits are paired through `pretrain_nb.cli.RENAMED` (read from this checkout).
Numbers that measure the clock or the machine (wall times, throughputs, speed ratios, memory) are not
results and are left out (TIMING_KEYS, BENCHMARK_KEYS). A value that only the after run has is reported
as added, not as a difference: a record may gain a field. Exit status: 0 when every value both runs
have is identical (or within --rtol/--atol), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# keys whose values are clock readings, not results: they differ between two runs of the same code
TIMING_KEYS = (
    "seconds",
    "wall_time",
    "time_s",
    "throughput",
    "per_s",
    "s_per_step",
    "elapsed",
    "speed",
    "peak_memory",
)


# the benchmark's speed ratios, by their exact names
BENCHMARK_KEYS = ("ratio_median", "ratio_min", "ratio_max")


def is_timing(key: str) -> bool:
    return key in BENCHMARK_KEYS or any(part in key.lower() for part in TIMING_KEYS)


def flatten(value, prefix: str = "") -> dict[str, object]:
    "Nested dicts and lists as {'a.b[2].c': leaf}, timing keys dropped."
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if not is_timing(str(k)):
                out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= flatten(v, f"{prefix}[{i}]")
    else:
        out[prefix] = value
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def relative_difference(a, b) -> float:
    "|a - b| / max(|a|, |b|) for two numbers; infinite for anything else that differs."
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        scale = max(abs(a), abs(b))
        return abs(a - b) / scale if scale else 0.0
    return 0.0 if same(a, b) else math.inf


def measured(record: dict) -> dict[str, object]:
    "What a results.json measured: its metrics and, per claim, the arms (by the claim's position)."
    claims = {f"claim {i} ({c['paper']['title'][:40]})": c["arms"] for i, c in enumerate(record["claims"])}
    return flatten({"metrics": record["metrics"], "claims": claims, "figures": record["figures"]})


def compare(
    before: Path, after: Path, renamed: dict[str, str], rtol: float = 0.0, atol: float = 0.0
) -> tuple[list[str], int]:
    "A line per notebook: identical (with the number of values compared) or what differs; and the failures."
    lines, failures = [], 0
    old = {p.parent.name: p for p in sorted(before.glob("*/results.json"))}
    new = {p.parent.name: p for p in sorted(after.glob("*/results.json"))}
    for name, path in old.items():
        target = renamed.get(name, name)
        label = name if target == name else f"{name} -> {target}"
        if target not in new:
            lines.append(f"{label:<36} MISSING after")
            failures += 1
            continue
        a, b = measured(json.loads(path.read_text())), measured(json.loads(new[target].read_text()))
        keys = sorted(set(a) | set(b))
        added = [k for k in keys if k not in a]
        keys = [k for k in keys if k in a]
        diff = [k for k in keys if k not in b or not same(a[k], b[k])]
        if added:
            lines.append(f"{label:<36} {len(added)} value(s) added: {', '.join(added[:6])}")
        common = [k for k in diff if k in a and k in b]
        numeric = all(relative_difference(a[k], b[k]) < math.inf for k in common)
        if diff and (rtol or atol) and len(common) == len(diff) and numeric:
            rel = max(relative_difference(a[k], b[k]) for k in common)
            gap = max(abs(a[k] - b[k]) for k in common)
            if all(relative_difference(a[k], b[k]) <= rtol or abs(a[k] - b[k]) <= atol for k in common):
                lines.append(f"{label:<36} {len(diff)} of {len(keys)} values differ, by at most {gap:.1e}")
                lines.append(f"{'':<36} ({rel:.1e} relative)")
                continue
        if diff:
            failures += 1
            lines.append(f"{label:<36} {len(diff)} of {len(keys)} values differ")
            for k in diff[:12]:
                lines.append(f"    {k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}")
        else:
            lines.append(f"{label:<36} identical ({len(keys)} values)")
    for name in sorted(set(new) - {renamed.get(n, n) for n in old}):
        lines.append(f"{name:<36} new after (nothing to compare)")
    lines.append(
        f"{len(old) - failures} of {len(old)} notebooks identical"
        + (f" (or within rtol {rtol:g} or atol {atol:g})" if rtol or atol else "")
    )
    return lines, failures


def run_smoke(rev: str, runs: Path) -> Path:
    "Check out `rev` into a temporary worktree, run every notebook in the smoke profile into `runs`."
    tree = Path(tempfile.mkdtemp(prefix="compare-smoke-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    env = os.environ | {
        "PYTHONPATH": str(tree),
        "PRETRAIN_NB_ROOT": str(tree),
        "PRETRAIN_NB_RUNS_DIR": str(runs),
        "PRETRAIN_NB_DATA_DIR": str(ROOT / "data"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    cli = Path(sys.executable).parent / "pretrain-nb"
    try:
        subprocess.run([str(cli), "run", "--all", "--profile", "smoke", "--seed", "0"], cwd=tree, env=env)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    return runs / "smoke"


def renamed_at(rev_root: Path | None) -> dict[str, str]:
    sys.path.insert(0, str(rev_root or ROOT))
    from pretrain_nb.cli import RENAMED

    return dict(RENAMED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="commit to run first")
    p.add_argument("--after", help="commit to compare with it")
    p.add_argument("--before-runs", type=Path, help="an existing runs/smoke folder instead of --before")
    p.add_argument("--after-runs", type=Path, help="an existing runs/smoke folder instead of --after")
    p.add_argument(
        "--rtol", type=float, default=0.0, help="accept numbers this close (relative); default exact"
    )
    p.add_argument(
        "--atol", type=float, default=0.0, help="accept numbers this close (absolute); default exact"
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare-smoke-runs-"))
    before = args.before_runs or run_smoke(args.before, work / "before")
    after = args.after_runs or run_smoke(args.after, work / "after")
    lines, failures = compare(before, after, renamed_at(None), args.rtol, args.atol)
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
