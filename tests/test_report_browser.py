"""The report site in a real headless browser (Debian's chromium, driven by selenium through its chromedriver).

Every page of a site built from a small results folder loads with no console error and no request outside the
site, every image decodes, every table and formula is laid out; the index shows every run's claim tally, and its
screenshot is saved under pytest's tmp folder (its path printed). One smoke check builds the site of the committed
results/ and loads each of its pages. Chromium never reaches the network here: every host name resolves to nothing,
so a page that asks for one fails, and its request is still logged, which is what the checks read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote

import pytest

from mdbench import verdicts
from mdbench.report import site

from report_results import write_results

REPO_RESULTS = Path(__file__).resolve().parents[1] / "results"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = (1400, 1000)

# What a page must show, read in the page: images that failed to decode, tables or formulas with nothing laid out.
LAYOUT_PROBLEMS = """
const problems = [];
for (const img of document.images)
  if (!img.complete || img.naturalWidth === 0)
    problems.push('image not rendered: ' + img.getAttribute('src').slice(0, 60));
for (const t of document.querySelectorAll('table'))
  if (t.rows.length === 0 || t.getBoundingClientRect().height === 0) problems.push('table not rendered: ' + t.id);
for (const m of document.querySelectorAll('math'))
  if (m.getBoundingClientRect().width === 0) problems.push('formula not rendered: ' + m.textContent.slice(0, 40));
return problems;
"""


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = (f"{' and '.join(missing)} not installed: `make test` installs Debian's chromium and chromium-driver "
                  "(or: apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):  # make test installs them there: a skip would hide a broken setup
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def page_problems(driver, page: Path, site_dir: Path) -> list[str]:
    """Load ``page`` and say what is wrong: console errors, requests outside ``site_dir`` (``data:`` URLs are in the
    page), images, tables or formulas not rendered."""
    for log in ("browser", "performance"):  # drop what earlier pages left
        driver.get_log(log)
    driver.get(page.as_uri())
    inside = site_dir.resolve().as_uri() + "/"
    problems = [f"console {e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not (url.startswith(inside) or url.startswith("data:")):
                problems.append(f"request outside the site: {url}")
    return problems + driver.execute_script(LAYOUT_PROBLEMS)


def broken_links(driver, site_dir: Path) -> list[str]:
    """The links of the loaded page that leave ``site_dir`` on disk or name a file it lacks (``http(s)`` links,
    such as a citation's, are not requests and are left alone)."""
    inside = site_dir.resolve().as_uri() + "/"
    hrefs = driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    local = [h.split("#")[0] for h in hrefs if h.startswith("file:")]
    return [h for h in local if not h.startswith(inside)
            or not (site_dir / unquote(h.removeprefix(inside))).is_file()]


def tallies_shown(driver) -> dict[tuple[str, str], list[int]]:
    """(paper, profile) -> the four counts of the index's row, as the browser shows them."""
    rows = driver.execute_script("""return Array.from(document.querySelectorAll('#papers tbody tr')).map(r =>
        [r.dataset.paper, r.dataset.profile, Array.from(r.querySelectorAll('td.verdict')).map(td => td.innerText)]);""")
    return {(paper, profile): [int(n) for n in counts] for paper, profile, counts in rows}


def tallies_expected(runs: list[site.Run], results_dir: Path) -> dict[tuple[str, str], list[int]]:
    """(paper, profile) -> the counts :func:`mdbench.verdicts.tally` gives (zeros for a run without claims)."""
    summary = verdicts.summary(results_dir)
    counts = verdicts.tally(summary).set_index(["paper", "profile"]) if len(summary) else None
    return {(r.paper, r.profile): [int(counts.loc[(r.paper, r.profile), s]) for s, _ in site.VERDICTS]
            if counts is not None and (r.paper, r.profile) in counts.index else [0] * len(site.VERDICTS) for r in runs}


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    results = write_results(tmp_path_factory.mktemp("results"), pareto=True)
    out = tmp_path_factory.mktemp("site") / "report"
    return out, site.build_site(results, out), results


def test_every_page_loads_offline_with_no_error_and_renders_its_images_tables_and_math(browser, small_site):
    out, _, _ = small_site
    pages = sorted(out.rglob("*.html"))
    assert [p.relative_to(out).as_posix() for p in pages] == [
        "index.html", "quickstart/cpu/00_quickstart.html", "quickstart/cpu/index.html", "quickstart/smoke/index.html"]
    for page in pages:
        assert page_problems(browser, page, out) == [], page
        assert broken_links(browser, out) == [], page
    browser.get((out / "quickstart" / "cpu" / "00_quickstart.html").as_uri())
    assert browser.execute_script("return document.querySelectorAll('math').length") == 2


def test_the_index_shows_every_runs_tally_and_its_screenshot_is_saved(browser, small_site, tmp_path, capsys):
    out, runs, results = small_site
    browser.get((out / "index.html").as_uri())
    assert tallies_shown(browser) == tallies_expected(runs, results)
    assert tallies_shown(browser)[("quickstart", "cpu")] == [1, 0, 1, 0]
    screenshot = tmp_path / "index.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:4] == b"\x89PNG"
    with capsys.disabled():
        print(f"\nscreenshot of the report's index: {screenshot}")


def test_the_checks_catch_an_outside_request_a_console_error_a_broken_image_and_a_broken_link(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><head><link rel="stylesheet" href="../outside.css"></head>'
                    '<body><img src="https://cdn.example.org/x.png"><img src="missing.png">'
                    '<script>console.error("boom")</script><table id="empty"></table>'
                    '<a href="gone.html">gone</a><a href="../outside.html">out</a><a href="bad.html#top">me</a>'
                    '<a href="https://doi.org/10.1/x">cited</a></body></html>')
    problems = "\n".join(page_problems(browser, page, tmp_path))
    assert "request outside the site: https://cdn.example.org/x.png" in problems
    assert f"request outside the site: {(tmp_path.parent / 'outside.css').as_uri()}" in problems
    assert "boom" in problems and "image not rendered: missing.png" in problems
    assert "table not rendered: empty" in problems
    assert broken_links(browser, tmp_path) == [(tmp_path / "gone.html").as_uri(),
                                               (tmp_path.parent / "outside.html").as_uri()]


def test_the_committed_results_make_a_site_whose_index_shows_every_papers_tally(browser, tmp_path):
    if not any(REPO_RESULTS.glob("*/*/records")):
        pytest.skip(f"no committed results under {REPO_RESULTS}")
    out = tmp_path / "report"
    runs = site.build_site(REPO_RESULTS, out)
    for page in sorted(out.rglob("*.html")):
        assert page_problems(browser, page, out) == [], page
        if page.name == "index.html":  # the site's own pages; a notebook's links are its author's
            assert broken_links(browser, out) == [], page
    browser.get((out / "index.html").as_uri())
    assert tallies_shown(browser) == tallies_expected(runs, REPO_RESULTS)
    assert {r.paper for r in runs} == {p.parent.parent.name for p in REPO_RESULTS.glob("*/*/records")}
