"""Find and read ``mdbench/papers/<paper>/paper.yaml``, the one file that holds what is known about a paper.

Each part of the file has one reader: the reported numbers and claims are read by
:func:`mdbench.results.load_reference`, the ``reproduce`` section (how ``mdbench reproduce`` runs the paper's
notebook, at which parameters) by :func:`mdbench.runner.load_papers`. Only yaml is imported here, so that the CLI
starts quickly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PAPERS_DIR = Path(__file__).resolve().parent / "papers"
FILE_NAME = "paper.yaml"


class PaperFileError(ValueError):
    """A paper.yaml that is missing, is not a YAML mapping, or lacks a key."""


def known_papers(papers_dir: Path = PAPERS_DIR) -> list[str]:
    """The papers under ``papers_dir``: every folder that holds a paper.yaml, by name; ``_``-folders (the template)
    are not papers."""
    return sorted(path.parent.name for path in papers_dir.glob(f"*/{FILE_NAME}") if not path.parent.name.startswith("_"))


def paper_file(paper: str, papers_dir: Path = PAPERS_DIR) -> Path:
    """The path of ``paper``'s paper.yaml; an unknown paper is an error that lists the known ones."""
    path = papers_dir / paper / FILE_NAME
    if not path.is_file():
        raise PaperFileError(f"unknown paper {paper!r} (no {path}); known papers: "
                             f"{', '.join(known_papers(papers_dir))}")
    return path


def read_paper_file(path: Path) -> dict[str, Any]:
    """The mapping a paper.yaml holds."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PaperFileError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise PaperFileError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def require(section: Any, key: str, path: Path, where: str = "") -> Any:
    """``section[key]``, or an error naming the file and the key's dotted path (``where`` is the section's)."""
    dotted = f"{where}.{key}" if where else key
    if not isinstance(section, dict):
        raise PaperFileError(f"{path}: {where or 'the file'} must be a mapping of keys, so that it can hold {dotted}")
    if key not in section:
        raise PaperFileError(f"{path} lacks the key {dotted}")
    return section[key]
