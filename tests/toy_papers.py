"""Toy notebooks and papers for the runner's tests: a papers folder of their own, passed as ``papers_dir``."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import torch
import yaml

from mdbench import samples

PROFILES = ("smoke", "cpu", "gpu")
PARAMS = "profile = 'smoke'\ndevice = 'cpu'\nresume = False\nseeds = [0, 1, 2]\nn_train = 96\nn_test = 48\nepochs = 2"
# The template's experiment as paper PAPER, one unit of work per seed; each unit says that it ran (in computed.txt)
# and takes TOY_UNIT_S seconds more.
_BODY = """\
import os, pathlib, time
from functools import partial
import pandas as pd
from mdbench import notebook, results, verdicts
from mdbench.papers._template import experiment as exp

session = notebook.start("PAPER", notebook.parameters(globals()), exp.Config)
cfg, data = session.config, exp.load_data(session.config)

def unit(seed):
    with open(pathlib.Path(os.environ["MDBENCH_RESULTS_DIR"]) / "computed.txt", "a") as log:
        log.write(f"{seed}\\n")
    outputs = exp.run(data, cfg, seed)
    time.sleep(float(os.environ["TOY_UNIT_S"]))
    return outputs

outputs = pd.concat([session.work("seed", partial(unit, seed), seed=seed) for seed in cfg.seeds], ignore_index=True)
session.record_frame("table1", exp.record(outputs), dataset=data.name, dataset_checksum=data.checksum,
                     config=cfg.as_record(), samples=outputs)
reference = results.load_reference("_template")
session.save_table(results.build_table(reference, session.store.records(), "table1"), "table1")
session.save_table(verdicts.evaluate_claims(reference, session.store.records(), session.store.samples), "claims")
"""


def body(paper: str = "toy") -> str:
    """The toy template notebook's code cell, recording as ``paper``."""
    return _BODY.replace("PAPER", paper)


BODY = body()


def write_notebook(path: Path, body: str, params: str = "profile = 'smoke'\ndevice = 'cpu'") -> Path:
    """A python3 notebook at ``path``: a cell tagged ``parameters`` holding ``params``, then ``body``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def write_paper(papers_dir: Path, notebook: Path, paper: str = "toy", datasets=(), order: int = 1,
                timeout_minutes: float = 2, **reproduce) -> Path:
    """``papers_dir/<paper>/paper.yaml`` whose ``reproduce`` section runs ``notebook`` (no parameters of its own at
    cpu and gpu; ``reproduce`` overrides any key, and leaves it out when given as None); returns ``papers_dir``."""
    section = {"order": order, "notebook": str(notebook.absolute()), "tier": "paper", "datasets": list(datasets),
               "minutes": dict.fromkeys(PROFILES, 1), "timeout_minutes": dict.fromkeys(PROFILES, timeout_minutes),
               "parameters": {"cpu": {}, "gpu": {}}, **reproduce}
    path = papers_dir / paper / "paper.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    section = {key: value for key, value in section.items() if value is not None}
    path.write_text(yaml.safe_dump({"paper": paper, "title": f"The {paper} paper", "reproduce": section}))
    return papers_dir


def run_here(results: Path, monkeypatch, paper: str = "toy", params: str = PARAMS) -> Path:
    """The toy notebook's code run to its end in this process (no papermill, no kernel: seconds); its folder."""
    results.mkdir()
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(results))
    monkeypatch.setenv("TOY_UNIT_S", "0")
    namespace: dict = {}
    exec(params, namespace)  # noqa: S102 - the test's own notebook
    try:
        exec(body(paper), namespace)  # noqa: S102
    finally:
        torch.use_deterministic_algorithms(False)  # the session turned them on for the smoke profile
    return results / paper / "smoke"


def outcome(folder: Path) -> dict:
    """Everything a run decided, without when and where it ran: each record, its per-sample outputs, the table and
    the claims."""
    found = {}
    for path in sorted((folder / "records").glob("*.json")):
        record = json.loads(path.read_text())
        found[path.name] = {k: v for k, v in record.items() if k not in ("fingerprint", "time")}
    for path in sorted((folder / "records").glob(f"*{samples.SUFFIX}")):
        found[path.name] = samples.read(path).to_dict("list")
    for name in ("table1.csv", "claims.csv"):
        found[name] = pd.read_csv(folder / name, keep_default_na=False).to_dict("list")  # empty cells stay ""
    return found
