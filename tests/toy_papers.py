"""Toy notebooks and papers for the runner's tests: a papers folder of their own, passed as ``papers_dir``."""
from __future__ import annotations

from pathlib import Path

import nbformat
import yaml

PROFILES = ("smoke", "cpu", "gpu")


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
