"""The course site in a real browser. The site is built from what is committed (the notebooks, and their
standard runs in figures/: nothing is trained), served by Python's web server and opened in headless
Chromium through Playwright. A family page shows its figures and typeset math, search finds a method, the
claims page lists every claim and filters them, and no page loads anything from another host. Skipped,
with the reason, where Playwright or Chromium is missing (scripts/setup.sh installs both where it can).
Screenshots are saved in the test's temporary folder."""

import functools
import http.server
import json
import re
import shutil
import threading

import pytest

from conftest import ROOT

FAMILY = "12_contrastive"  # a family page with figures and math


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from pretrain_nb.site import build_site

    out = tmp_path_factory.mktemp("site") / "site"
    build_site(out, root=ROOT)
    return out


def test_no_page_loads_anything_from_another_host(site):
    "Scripts, styles, fonts and math come from the site itself, so it reads offline."
    remote = {}
    for page in site.rglob("*.html"):
        found = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="((?:https?:)?//[^"]+)"', page.read_text())
        if found:
            remote[page.name] = found
    assert not remote, remote


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium on this machine (Debian: apt-get install chromium; scripts/setup.sh does it)"
        )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    shots = tmp_path_factory.mktemp("screenshots")
    with sync_api.sync_playwright() as p:
        try:
            chrome = p.chromium.launch(executable_path=chromium)
        except sync_api.Error as e:  # a snap or too old a Chromium that Playwright cannot drive
            server.shutdown()
            pytest.skip(f"Chromium at {chromium} does not start under Playwright: {str(e).splitlines()[0]}")
        page = chrome.new_page(viewport={"width": 1280, "height": 900})
        elsewhere = []
        page.on("request", lambda r: None if r.url.startswith((base, "data:")) else elsewhere.append(r.url))
        yield page, base, shots, elsewhere
        chrome.close()
    server.shutdown()
    assert not elsewhere, f"the pages requested {elsewhere}"


def test_home_page_lists_the_parts_and_links_every_notebook(browser):
    page, base, shots, _ = browser
    page.goto(f"{base}/index.html")
    page.screenshot(path=shots / "home.png")
    text = page.inner_text("article")
    assert "1x vision self-supervised" in text and "6x science with synthetic tasks" in text
    links = page.eval_on_selector_all("article a", "els => els.map(e => e.getAttribute('href'))")
    notebooks = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))
    assert all(f"{name}.html" in links for name in notebooks), (notebooks, links)


def test_family_page_shows_its_figures_and_typeset_math(browser):
    page, base, shots, _ = browser
    page.goto(f"{base}/{FAMILY}.html")
    page.wait_for_function(
        "window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0"
        " && document.querySelectorAll('.MathJax, .MathJax_Display').length > 0",
        timeout=30_000,
    )
    page.screenshot(path=shots / "family.png")
    executed = json.loads((ROOT / "figures" / FAMILY / f"{FAMILY}.ipynb").read_text())
    pngs = sum("image/png" in o.get("data", {}) for c in executed["cells"] for o in c.get("outputs", []))
    widths = page.eval_on_selector_all(".jp-OutputArea-output img", "els => els.map(e => e.naturalWidth)")
    assert pngs > 0 and len(widths) == pngs and min(widths) > 100, (pngs, widths)  # every figure loaded
    prose = page.eval_on_selector_all(".jp-MarkdownOutput", "els => els.map(e => e.innerText).join(' ')")
    assert "$" not in prose, "raw TeX left on the page: MathJax did not typeset it"
    assert "#| export" not in page.inner_text("article") and "In [" not in page.inner_text("article")
    assert page.locator(".md-footer__link--next").count() == 1  # the next notebook, and
    assert page.locator(".md-footer__link--prev").count() == 1  # the previous one


def test_search_finds_a_method(browser):
    page, base, shots, _ = browser
    page.goto(f"{base}/index.html")
    page.fill("input.md-search__input", "InfoNCE")
    page.wait_for_selector(".md-search-result__item", timeout=20_000)
    page.screenshot(path=shots / "search.png")
    hits = page.eval_on_selector_all(".md-search-result__item a", "els => els.map(e => e.href)")
    assert any(f"/{FAMILY}.html" in h for h in hits), hits


def test_claims_page_lists_every_claim_and_filters_them(browser):
    page, base, shots, _ = browser
    claims = [
        c
        for p in sorted((ROOT / "figures").glob("*/results.json"))
        for c in json.loads(p.read_text())["claims"]
    ]
    page.goto(f"{base}/claims.html")
    assert page.locator("#claims tbody tr").count() == len(claims) > 0
    page.select_option("#claims-verdict", "reproduced")
    shown = sum(c["verdict"] == "reproduced" for c in claims)
    assert page.inner_text("#claims-count") == f"{shown} of {len(claims)} claims"
    assert page.locator("#claims tbody tr:visible").count() == shown
    page.screenshot(path=shots / "claims.png")
    page.select_option("#claims-verdict", "")
    page.select_option("#claims-part", "1")
    in_part_1 = sum(
        len(json.loads(p.read_text())["claims"]) for p in (ROOT / "figures").glob("1*/results.json")
    )
    assert page.locator("#claims tbody tr:visible").count() == in_part_1
