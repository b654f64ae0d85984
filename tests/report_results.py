"""A small results folder for the report's tests, written by the suite's own code (records, tables, claims).

quickstart/cpu: table1 records of three seeds, its table, a wide view, the judged claims (one holds, one
inconclusive), a figure and an executed notebook with math, an image, an HTML table and a tqdm widget (whose
manager a static page must not fetch). quickstart/smoke: records only (no claims judged).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import pandas as pd
from matplotlib.figure import Figure
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from mdbench import results, verdicts
from mdbench.results import ResultStore

# (row, metric) -> values over seeds 0, 1, 2. Accuracy: trained far above untrained (holds); AUC: trained above
# untrained + 10 points in one seed only (inconclusive).
VALUES = {("trained", "accuracy"): [80.0, 82.0, 84.0], ("untrained", "accuracy"): [50.0, 52.0, 51.0],
          ("trained", "auc"): [60.0, 75.0, 62.0], ("untrained", "auc"): [50.0, 51.0, 52.0]}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TQDM_TEXT = "training: 100%|##########| 3/3"
MATH_MARKDOWN = r"The loss $\mathcal{L} = \frac{1}{N}\sum_i \ell_i$ and $$\lVert x \rVert_2^2$$"


def figure_png() -> bytes:
    """A small line plot as PNG bytes."""
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1, 2], VALUES[("trained", "accuracy")])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def executed_notebook(png: bytes) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: Markdown with math, an image, an HTML table and a widget view whose state
    is in the notebook's metadata."""
    widget = {"model_id": "m1", "version_major": 2, "version_minor": 0}
    outputs = [new_output("display_data", data={"image/png": base64.b64encode(png).decode()}),
               new_output("execute_result", data={"text/html": "<table><tr><th>row</th><th>accuracy</th></tr>"
                                                                "<tr><td>trained</td><td>82.0</td></tr></table>",
                                                  "text/plain": "table"}, execution_count=1),
               new_output("display_data", data={WIDGET_VIEW: widget, "text/plain": TQDM_TEXT})]
    nb = new_notebook(cells=[new_markdown_cell("# Quickstart\n\n" + MATH_MARKDOWN),
                             new_code_cell("train()", outputs=outputs, execution_count=1)])
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {"m1": {"model_name": "HTMLModel", "state": {}}},
                                             "version_major": 2, "version_minor": 0}}
    return nb


def write_results(root: Path, pareto: bool = False) -> Path:
    """Write the small results folder under ``root`` (with a cross-paper figure in ``pareto/`` if asked)."""
    reference = results.load_reference("quickstart")
    for profile in ("cpu", "smoke"):
        store = ResultStore("quickstart", profile, root=root)
        for (row, metric), values in VALUES.items():
            store.record("table1", row, metric, values, dataset="pneumoniamnist", dataset_checksum="test",
                         config={"epochs": 1}, seeds=[0, 1, 2], unit="%")
    store = ResultStore("quickstart", "cpu", root=root)
    store.save_table(results.build_table(reference, store.records(), "table1"), "table1")
    store.save_table(pd.DataFrame({"row": ["trained"], "accuracy": ["82.00 ± 2.00"]}), "table1_wide")
    verdicts.judge_store(store)
    png = figure_png()
    (store.dir / "training.png").write_bytes(png)
    nbformat.write(executed_notebook(png), store.dir / "00_quickstart.executed.ipynb")
    if pareto:
        (root / "pareto").mkdir()
        (root / "pareto" / "pareto.png").write_bytes(png)
        (root / "pareto" / "pareto.pdf").write_bytes(b"%PDF-1.4\n")
    return root
