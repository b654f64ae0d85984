"""A paper notebook's parameters as one frozen config: ``Config.from_params(params)`` refuses a key it does not know.

Every ``mdbench/papers/<paper>/experiment.py`` defines ``@dataclass(frozen=True) class Config(NotebookConfig)``
whose fields are the notebook's parameters (their values come from the notebook's parameters cell or a profile;
the field defaults are the paper's recipe, for tests and for the settings no profile changes).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

C = TypeVar("C", bound="NotebookConfig")

# where the data lies on this machine: not part of what decides a number, so never written into a record
MACHINE_FIELDS = ("data_dir", "cases_dir")
# parameters that only pick which units of work run, each unit being keyed by its own value (mdbench.work)
SELECTORS = ("seeds",)


def _frozen(value: Any) -> Any:
    """Lists (as YAML and notebooks write sequences) become tuples, so a frozen config holds no mutable list."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


class NotebookConfig:
    """Base of each paper's ``Config`` dataclass.

    ``selectors``: the fields that only pick which units of work run (seeds, datasets, ...: each unit is keyed by
    its own seed or dataset), left out of :meth:`work_config`, so that a run over more seeds, or a shard over some
    of them, reuses the units another run made (:mod:`mdbench.work`).

    ``later_fields``: fields added after records were made, recorded only where set away from their default, so
    that those records keep their config and its hash.
    """

    selectors: ClassVar[tuple[str, ...]] = SELECTORS
    later_fields: ClassVar[tuple[str, ...]] = ()

    if TYPE_CHECKING:  # every subclass is a @dataclass: tells mypy that fields() and asdict() apply to it
        __dataclass_fields__: ClassVar[dict[str, Any]]

    @classmethod
    def from_params(cls: type[C], params: Mapping[str, Any]) -> C:
        """The config of a notebook's parameters; a key that is no field raises ``ValueError`` naming it."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{cls.__module__}.{cls.__name__} has no parameter {', '.join(map(repr, unknown))} "
                             f"(a typo in the notebook or the profile?); it knows {', '.join(sorted(known))}")
        return cls(**{name: _frozen(value) for name, value in params.items()})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_record(self) -> dict[str, Any]:
        """What each record stores as its config: every field except where the data lies on this machine and the
        :attr:`later_fields` at their defaults."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in self.as_dict().items()
                if k not in MACHINE_FIELDS and not (k in self.later_fields and v == defaults[k])}

    def work_config(self) -> dict[str, Any]:
        """What decides a unit of work's result: :meth:`as_record` without the :attr:`selectors`."""
        return {k: v for k, v in self.as_record().items() if k not in self.selectors}
