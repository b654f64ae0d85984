"""``mdbench report``: numbers as numbers, math as MathML, nothing fetched from outside, every run's claim tally.

The site's behaviour in a real browser is tests/test_report_browser.py's.
"""
from __future__ import annotations

import math
import re

import nbformat
import pandas as pd
import pytest

from mdbench import cli, verdicts
from mdbench.report import notebooks, site, tables
from mdbench.results import TABLE_COLUMNS

from report_results import TQDM_TEXT, executed_notebook, figure_png, write_results

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def built(small_results, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "report"
    return out, site.build_site(small_results, out)


@pytest.mark.parametrize(("value", "shown"), [(69.7777, "69.78"), (5728796.0, "5,728,796"), (0.049408, "0.04941"),
                                              (-2.314814, "−2.315"), (1333.65, "1,334"), (0.0, "0"),
                                              (1e-9, "0.000000"), (math.nan, "—")])
def test_numbers_keep_four_significant_digits_and_their_full_value(value, shown):
    cell = tables.number(value)
    assert cell.text == shown and cell.numeric
    assert cell.full == ("" if math.isnan(value) else repr(value))


def records_frame(paper: list) -> pd.DataFrame:
    rows = [{"dataset": "d", "row": r, "metric": "accuracy", "paper": p, "reproduced": "82.00 ± 2.00 (n=3)",
             "delta": "+2.00" if p != "not reported" else "—", "vs_paper": "better" if p != "not reported" else "—",
             "status": "comparable", "mean": 82.0, "std": 2.0, "n": 3, "units": units, "ci_low": 77.03,
             "ci_high": 86.97} for r, p, units in zip(["a", "b"], paper, [40, math.nan], strict=True)]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def test_a_records_table_shows_its_numeric_columns_not_the_formatted_string():
    t = tables.records_table("table1", records_frame(["not reported", "not reported"]))
    assert t.header == ["dataset", "row", "metric", "mean", "std", "n", "units", "95 % CI low", "95 % CI high",
                        "status"]
    assert [c.text for c in t.rows[0]] == ["d", "a", "accuracy", "82.00", "2.000", "3", "40", "77.03", "86.97",
                                           "comparable"]
    assert t.rows[1][6].text == "—"  # no per-sample outputs behind it
    assert t.note == "The paper reports none of these numbers."


def test_a_records_table_keeps_the_paper_columns_where_the_paper_reports_a_number():
    t = tables.records_table("table1", records_frame(["80.00", "not reported"]))
    assert t.header[9:12] == ["paper", "Δ", "vs paper"]
    assert [c.text for c in t.rows[0][9:12]] == ["80.00", "2.000", "better"]
    assert [c.text for c in t.rows[1][9:12]] == ["—", "—", "—"]
    assert t.note == ""


def test_read_table_tells_records_and_claims_tables_from_views(tmp_path):
    records_frame(["not reported"] * 2).to_csv(tmp_path / "table1.csv", index=False)
    pd.DataFrame({"row": ["a"], "accuracy": ["82.00 ± 2.00"]}).to_csv(tmp_path / "wide.csv", index=False)
    assert tables.read_table(tmp_path / "table1.csv").name == "table1"
    assert tables.read_table(tmp_path / "wide.csv") is None


def test_every_verdict_has_its_colour_and_an_unknown_one_is_refused():
    assert [tables.verdict_class(s) for s in ("holds", "does not hold", "inconclusive", "inconclusive (n=1)",
                                              "not run")] == ["holds", "fails", "inconclusive", "inconclusive",
                                                              "not-run"]
    with pytest.raises(ValueError, match="unknown claim status"):
        tables.verdict_class("maybe")


def test_math_becomes_mathml_and_unparsable_tex_stays_visible():
    assert notebooks.mathml(r"x^2").startswith("<math")
    assert 'display="block"' in notebooks.mathml(r"\frac{1}{2}", display="block")
    assert notebooks.mathml(r"\frac{1}{") == r'<code class="tex">\frac{1}{</code>'


def test_a_rendered_notebook_fetches_nothing_and_drops_progress_widgets(tmp_path):
    path = tmp_path / "nb.executed.ipynb"
    nbformat.write(executed_notebook(figure_png()), path)
    page = notebooks.render_notebook(path, "Quickstart (cpu)", "index.html")
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<script" not in page  # no require.js, MathJax, mermaid or widget manager
    assert page.count("<math") == 2 and "$" not in page.split("<body", 1)[1].split("train()")[0]
    assert TQDM_TEXT.replace("|", "") not in page.replace("|", "")  # a saved bar: progress of a run long over
    assert 'src="data:image/png;base64,' in page and '<a href="index.html">' in page


def test_the_index_shows_every_runs_claim_tally(small_results, built):
    out, runs = built
    index = (out / "index.html").read_text()
    expected = verdicts.tally(verdicts.summary(small_results)).set_index(["paper", "profile"])
    assert [(r.paper, r.profile) for r in runs] == [("quickstart", "cpu"), ("quickstart", "smoke")]
    for run in runs:
        row = re.search(rf'<tr data-paper="{run.paper}" data-profile="{run.profile}">(.*?)</tr>', index, re.S)
        counts = [int(n) for n in re.findall(r'<td class="num verdict[^"]*">(\d+)</td>', row.group(1))]
        want = ([int(expected.loc[(run.paper, run.profile), s]) for s, _ in site.VERDICTS]
                if (run.paper, run.profile) in expected.index else [0, 0, 0, 0])
        assert counts == want
    assert runs[0].tally == {"holds": 1, "does not hold": 0, "inconclusive": 1, "not run": 0}
    assert "no claims judged" in index  # the smoke run has records but no claims.csv
    assert "No cross-paper figure yet" in index and "<img" not in index


def test_a_run_page_has_numeric_tables_coloured_claims_figures_and_its_notebook(built):
    out, _ = built
    page = (out / "quickstart" / "cpu" / "index.html").read_text()
    table1 = page.split('<h3 id="table1">')[1].split("<h2")[0]
    trained = re.search(r"<tr><td>pneumoniamnist</td><td>trained</td><td>accuracy</td>(.*?)</tr>", table1).group(1)
    assert re.findall(r'<td class="num"[^>]*>([^<]*)</td>', trained)[:3] == ["82.00", "2.000", "3"]  # mean, std, n
    assert "±" not in table1  # the formatted string is not shown, nor is the wide view
    assert '<a href="table1_wide.csv">' in page and (out / "quickstart" / "cpu" / "table1_wide.csv").exists()
    assert page.count('class="verdict holds"') == 1 and page.count('class="verdict inconclusive"') == 1
    assert '<img src="training.png"' in page and (out / "quickstart" / "cpu" / "training.png").exists()
    assert '<a href="00_quickstart.html">' in page and (out / "quickstart" / "cpu" / "00_quickstart.html").exists()
    assert not any(EXTERNAL.search(p.read_text()) for p in out.rglob("*.html"))


def test_a_cross_paper_figure_slots_into_the_index(tmp_path):
    runs = site.build_site(write_results(tmp_path / "results", pareto=True), tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert runs and '<img src="cross-paper/pareto.png"' in index and 'href="cross-paper/pareto.pdf"' in index
    assert (tmp_path / "site" / "cross-paper" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rebuild_replaces_the_previous_site(small_results, tmp_path):
    out = tmp_path / "site"
    site.build_site(small_results, out)
    (out / "stale.html").write_text("old")
    site.build_site(small_results, out)
    assert not (out / "stale.html").exists() and (out / "index.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no temporary folder left beside it


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_the_site_never_overlaps_the_results(small_results, where):
    out = {"same": small_results, "inside": small_results / "report", "holds": small_results.parent}[where]
    with pytest.raises(site.ReportError, match="overlap"):
        site.build_site(small_results, out)


def test_a_folder_that_is_not_a_site_is_not_replaced(small_results, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(site.ReportError, match="not a site built by mdbench report"):
        site.build_site(small_results, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_report_builds_the_site_and_refuses_an_empty_results_folder(small_results, tmp_path, capsys):
    assert cli.main(["report", "--results-dir", str(small_results), "--out", str(tmp_path / "site")]) == 0
    assert str((tmp_path / "site" / "index.html").resolve()) in capsys.readouterr().out
    assert cli.main(["report", "--results-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "s2")]) == 2
    assert "no results under" in capsys.readouterr().err


def test_a_runs_known_problems_show_on_its_page_and_the_index_links_them(tmp_path):
    results = write_results(tmp_path / "results")
    (results / "quickstart" / "cpu" / site.KNOWN_PROBLEMS).write_text(
        "- **Seed 1 learned nothing**: accuracy `62.50` <script>alert(1)</script>\n")
    site.build_site(results, tmp_path / "site")
    page = (tmp_path / "site" / "quickstart" / "cpu" / "index.html").read_text()
    problems = page.split('id="known-problems">')[1].split("</section>")[0]
    assert "<strong>Seed 1 learned nothing</strong>" in problems and "<code>62.50</code>" in problems
    assert "<script>" not in problems and "&lt;script&gt;" in problems  # raw HTML is shown, not run
    index = (tmp_path / "site" / "index.html").read_text()
    cpu = re.search(r'<tr data-paper="quickstart" data-profile="cpu">(.*?)</tr>', index, re.S).group(1)
    smoke = re.search(r'<tr data-paper="quickstart" data-profile="smoke">(.*?)</tr>', index, re.S).group(1)
    assert 'href="quickstart/cpu/index.html#known-problems"' in cpu and "known problems" not in smoke
    assert "known-problems" not in (tmp_path / "site" / "quickstart" / "smoke" / "index.html").read_text()
