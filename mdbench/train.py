"""One training loop for the whole suite: AMP, progress bar, early stopping, checkpoint + resume, prediction.

Papers with unusual steps (distillation, MIL bags, several losses) pass a ``step_fn`` instead of writing a
new loop. Written by hand because Lightning/Ignite are not dependencies of the suite and the loop is short.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mdbench.io import atomic_write
from mdbench.repro import seed_rngs

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]]
EvalFn = Callable[[nn.Module, Iterable, torch.device], Mapping[str, float]]
PredictFn = Callable[[nn.Module, Any], tuple[Any, Any]]


# --------------------------------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------------------------------
def move_to_device(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside (nested) tuples, lists and dicts moved to ``device``; other objects returned as they are.

    Copies to an accelerator are non-blocking (the stream orders them before the kernels that read them); copies
    to the CPU block until the data has arrived, because the host reads them next.
    """
    device = torch.device(device)
    return _move(obj, device, non_blocking=device.type != "cpu")


def _move(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        # A non-blocking device-to-host copy returns a pinned buffer that the GPU fills later: reading it
        # before a synchronisation gives garbage (issue 15: rd's test labels came back as 4.5e18).
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        # a plain dict: rebuilding the concrete class fails for defaultdict (its first argument is a factory)
        return {k: _move(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device, non_blocking) for v in obj)
    return obj


def default_step(loss_fn: Callable[[Any, Any], torch.Tensor]) -> StepFn:
    """The step for ``batch = (x, y)``: ``loss_fn(model(x), y)``, with no extra logs."""

    def step(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = _split_batch(batch)
        return loss_fn(model(x), y), {}

    return step


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"the default step expects batches (x, y, ...), got {type(batch).__name__}; pass step_fn for other batches"
    )


# --------------------------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Stop when ``monitor`` (a key of the epoch record, e.g. ``val_loss``) has not improved for ``patience``
    epochs. Improvement means beating the best value by more than ``min_delta`` in direction ``mode``.
    ``restore_best`` loads the best epoch's weights into the model when training ends."""

    monitor: str = "val_loss"
    patience: int = 5
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping.mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"EarlyStopping.patience must be >= 1, got {self.patience}")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@dataclass
class History:
    """What ``fit`` did.

    ``epochs``: one record per epoch: ``epoch`` (1-based), ``step`` (optimizer steps so far), ``train_loss``,
    ``val_loss`` (with a val loader), ``train_<log>``/``val_<log>`` (means of the step_fn logs), the
    eval_fn metrics, ``lr`` and ``seconds``. ``steps``: ``{step, epoch, loss}`` every ``log_every`` steps.
    ``stop_reason``: ``"epochs"``, ``"max_steps"`` or ``"early_stopping"``.
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    global_step: int = 0
    best_epoch: int | None = None
    best_value: float | None = None
    stop_reason: str | None = None

    def to_frame(self) -> pd.DataFrame:
        """The per-epoch records as a DataFrame, one row per epoch."""
        return pd.DataFrame(self.epochs)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: a crash never leaves a partial
    ``path``, and an older file at ``path`` survives a failed save."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def _rng_state(loader: Iterable) -> dict[str, Any]:
    generator = getattr(loader, "generator", None)
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: Mapping[str, Any], loader: Iterable) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if state["loader"] is not None and generator is not None:
        generator.set_state(state["loader"])


@dataclass
class _Checkpointing:
    """Where the ``fit`` calls inside :func:`checkpointing` checkpoint: ``folder/fit-<n>``, n counting the calls."""

    folder: Path
    every_s: float
    calls: int = 0

    def next_dir(self) -> Path:
        self.calls += 1
        return self.folder / f"fit-{self.calls - 1}"


_CHECKPOINTING: ContextVar[_Checkpointing | None] = ContextVar("mdbench_checkpointing", default=None)


@contextlib.contextmanager
def checkpointing(folder: str | Path, every_s: float = 60.0) -> Iterator[None]:
    """Inside this context every :func:`fit` without a ``checkpoint_dir`` of its own checkpoints into
    ``folder/fit-<n>`` (n: 0 for the first call made inside, 1 for the next, ...) once ``every_s`` seconds have passed
    since its last checkpoint (``checkpoint_every_s``), and resumes from there. Run the same code inside it again
    after an interruption and each training continues from its last checkpoint, one that had finished by loading
    it, losing at most about ``every_s`` seconds each, while trainings shorter than that write nothing: this is how
    a unit of work (:mod:`mdbench.work`) picks up its long trainings."""
    token = _CHECKPOINTING.set(_Checkpointing(Path(folder), every_s))
    try:
        yield
    finally:
        _CHECKPOINTING.reset(token)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights where they are: on a GPU the copy stays there, so that an epoch that improves
    neither waits for the GPU nor sends the model through the host (on the CPU, a copy on the CPU as before)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to("cpu") for k, v in state.items()}


@dataclass
class _TrainState:
    """Everything ``last.pt`` holds, so that a resumed run continues exactly where the last one stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    history: History = field(default_factory=History)
    bad_epochs: int = 0
    best_model: dict[str, torch.Tensor] | None = None  # on the model's device (the CPU once loaded); in best.pt

    def save(self, ckpt_dir: Path, loader: Iterable) -> None:
        save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "history": dataclasses.asdict(self.history),
                "bad_epochs": self.bad_epochs,
                "rng": _rng_state(loader),
            },
            ckpt_dir / "last.pt",
        )

    def load(self, ckpt_dir: Path, loader: Iterable) -> None:
        # Our own file, holding RNG states (NumPy arrays, Python tuples) that weights_only would refuse.
        ckpt = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.history = History(**ckpt["history"])
        self.bad_epochs = ckpt["bad_epochs"]
        if (ckpt_dir / "best.pt").exists():
            self.best_model = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)["model"]
        _set_rng_state(ckpt["rng"], loader)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def _autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported, else fp16."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if not isinstance(amp, bool) and amp not in dtypes:
        raise ValueError(f"amp must be a bool, 'bf16' or 'fp16', got {amp!r}")
    if amp is False or device.type != "cuda":
        return None
    if amp is True:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtypes[amp]


def _batch_size(batch: Any) -> int:
    """Leading size of the first tensor in the batch, to weight epoch means; 1 when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        if isinstance(item, (torch.Tensor, Mapping, list, tuple)):
            return _batch_size(item)
    return 1


class _Means:
    """Running sample-weighted means of scalar logs; tensors stay on their device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.count = 0

    def add(self, logs: Mapping[str, float | torch.Tensor], n: int) -> None:
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.count += n

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": float(s) / self.count for k, s in self.sums.items()}


def _check_args(epochs: int, max_steps: int | None, grad_clip: float | None, log_every: int, loader: Iterable) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if hasattr(loader, "__len__") and len(cast(Sized, loader)) == 0:
        raise ValueError("train_loader is empty: it yields no batches")


def _evaluate(model: nn.Module, loader: Iterable, step: StepFn, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Sample-weighted mean loss and logs of ``step`` over ``loader``, in eval mode without gradients."""
    model.eval()
    means = _Means()
    with torch.no_grad():
        for batch in loader:
            batch = move_to_device(batch, device)
            with _autocast(device, dtype):
                loss, logs = step(model, batch)
            means.add({"loss": loss, **logs}, _batch_size(batch))
    if means.count == 0:
        raise ValueError("val_loader is empty: it yields no batches")
    return means.means("val_")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _train_epoch(
    state: _TrainState,
    loader: Iterable,
    step_fn: StepFn,
    device: torch.device,
    dtype: torch.dtype | None,
    grad_clip: float | None,
    scheduler_per_step: bool,
    max_steps: int | None,
    log_every: int,
    progress: bool,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader`` (or up to ``max_steps``); returns ``train_loss`` and the ``train_<log>`` means."""
    model, optimizer, scaler, history = state.model, state.optimizer, state.scaler, state.history
    model.train()
    means = _Means()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for batch in bar:
        batch = move_to_device(batch, device)
        with _autocast(device, dtype):
            loss, logs = step_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler_per_step:
            state.scheduler.step()
        history.global_step += 1
        means.add({"loss": loss, **logs}, _batch_size(batch))
        if history.global_step % log_every == 0:
            history.steps.append({"step": history.global_step, "epoch": epoch, "loss": loss.item()})
            bar.set_postfix(loss=f"{history.steps[-1]['loss']:.4g}")
        if max_steps is not None and history.global_step >= max_steps:
            break
    bar.close()
    if means.count == 0:
        raise ValueError("train_loader is empty: it yields no batches")
    out = means.means("train_")
    if not math.isfinite(out["train_loss"]):
        raise FloatingPointError(f"train loss is {out['train_loss']} in epoch {epoch}: training diverged")
    return out


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    epochs: int,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    amp: bool | Literal["bf16", "fp16"] = False,
    grad_clip: float | None = None,
    scheduler: Any = None,
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    scheduler_monitor: str | None = None,
    early_stopping: EarlyStopping | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    checkpoint_every_s: float = 0.0,
    progress: bool = True,
    step_fn: StepFn | None = None,
    eval_fn: EvalFn | None = None,
    seed: int | None = None,
    log_every: int = 10,
) -> History:
    """Train ``model`` and return its :class:`History`.

    Args:
        model: the module to train (moved to ``device``).
        train_loader, val_loader: iterables of batches (usually DataLoaders). With a val loader each epoch
            records ``val_loss`` (the step's loss, sample-weighted, in eval mode without gradients).
        loss_fn: ``loss_fn(model(x), y)`` for the default step on batches ``(x, y, ...)``.
        optimizer: defaults to ``AdamW(lr=lr)`` over the parameters that require grad.
        epochs: total epochs of the run (a resumed run continues up to this number).
        max_steps: stop after this many optimizer steps in all (the epoch in progress is still validated).
        amp: autocast on CUDA: ``True`` (bf16 where supported, else fp16), ``"bf16"`` or ``"fp16"`` (with a
            GradScaler); ignored on CPU.
        grad_clip: max global gradient norm.
        scheduler: a torch LR scheduler on ``optimizer``, stepped every epoch or every optimizer step
            (``scheduler_interval``); ``ReduceLROnPlateau`` is stepped each epoch with the record's
            ``scheduler_monitor`` (default ``val_loss`` with a val loader, else ``train_loss``).
        early_stopping: see :class:`EarlyStopping`; its monitor also picks ``best.pt``.
        checkpoint_dir: each epoch writes ``last.pt`` (model, optimizer, scheduler, scaler, history, early
            stopping state, RNG states incl. the loader's generator) and, when the monitored value improves,
            ``best.pt`` (``{"model", "epoch", "value"}``); both atomically. The monitor is the early stopping
            one, else ``val_loss`` (with a val loader) or ``train_loss``, minimised.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists; with the same seed and loaders the
            resumed run ends with the weights of an uninterrupted one.
        checkpoint_every_s: checkpoint after an epoch only when this many seconds have passed since the last
            checkpoint (or the start; 0: after every epoch), so that a resumed run repeats at most about this much
            training and a short one writes nothing. Inside :func:`checkpointing`, a fit without
            ``checkpoint_dir`` checkpoints into the context's folder at the context's pace.
        progress: show tqdm bars (epochs, and batches within an epoch).
        step_fn: ``step_fn(model, batch) -> (loss, logs)`` replacing the default step; ``logs`` is a dict of
            scalars averaged per epoch into ``train_<key>``/``val_<key>``. The batch is already on ``device``.
        eval_fn: ``eval_fn(model, val_loader, device) -> {name: value}`` run after each epoch in eval mode
            without gradients; its keys join the epoch record as given (e.g. ``val_auc``).
        seed: seeds Python/NumPy/torch at the start (data order, dropout). Seed before building the model
            to fix its initial weights too.
        log_every: record ``{step, epoch, loss}`` in ``History.steps`` and refresh the bar every this many steps.
    """
    device = torch.device(device)
    _check_args(epochs, max_steps, grad_clip, log_every, train_loader)
    if step_fn is None:
        if loss_fn is None:
            raise ValueError("fit needs loss_fn (for the default (x, y) step) or step_fn")
        step_fn = default_step(loss_fn)
    if eval_fn is not None and val_loader is None:
        raise ValueError("eval_fn evaluates on val_loader: pass val_loader too")
    if scheduler is not None and optimizer is None:
        raise ValueError("a scheduler needs the optimizer it was built on: pass optimizer= too")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and scheduler_interval == "step":
        raise ValueError("ReduceLROnPlateau needs an epoch metric: use scheduler_interval='epoch'")
    if seed is not None:
        seed_rngs(seed)

    model.to(device)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    dtype = _autocast_dtype(amp, device)
    state = _TrainState(model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
    monitor = early_stopping or EarlyStopping(monitor="val_loss" if val_loader is not None else "train_loss")
    scheduler_monitor = scheduler_monitor or ("val_loss" if val_loader is not None else "train_loss")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is None and (ambient := _CHECKPOINTING.get()) is not None:
        ckpt_dir, checkpoint_every_s = ambient.next_dir(), ambient.every_s
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume and (ckpt_dir / "last.pt").exists():
            state.load(ckpt_dir, train_loader)
    history = state.history

    def finished() -> bool:
        return (
            history.stop_reason == "early_stopping"
            or len(history.epochs) >= epochs
            or (max_steps is not None and history.global_step >= max_steps)
        )

    epoch_bar = tqdm(total=epochs, initial=len(history.epochs), desc="epochs", disable=not progress)
    saved_at, best_saved = time.monotonic(), True
    while not finished():
        epoch, start = len(history.epochs) + 1, time.perf_counter()
        record: dict[str, float] = {"epoch": epoch}
        record.update(
            _train_epoch(state, train_loader, step_fn, device, dtype, grad_clip, scheduler_interval == "step",
                         max_steps, log_every, progress, epoch)
        )
        record["step"] = history.global_step
        if val_loader is not None:
            record.update(_evaluate(model, val_loader, step_fn, device, dtype))
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                # fit refused eval_fn without val_loader on entry
                record.update({k: float(v) for k, v in eval_fn(model, cast(Iterable, val_loader), device).items()})
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - start
        history.epochs.append(record)

        if plateau:
            scheduler.step(_lookup(record, scheduler_monitor))
        elif scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()

        value = _lookup(record, monitor.monitor)
        if monitor.improved(value, history.best_value):
            history.best_value, history.best_epoch, state.bad_epochs = value, epoch, 0
            state.best_model, best_saved = _snapshot(model), False
        else:
            state.bad_epochs += 1
        if early_stopping is not None and state.bad_epochs >= early_stopping.patience:
            history.stop_reason = "early_stopping"
        elif max_steps is not None and history.global_step >= max_steps:
            history.stop_reason = "max_steps"
        elif len(history.epochs) >= epochs:
            history.stop_reason = "epochs"
        else:
            history.stop_reason = None

        if ckpt_dir is not None and time.monotonic() - saved_at >= checkpoint_every_s:
            if not best_saved:  # written with last.pt, so that the two always describe the same epoch
                assert state.best_model is not None  # best_saved turns False only with a snapshot
                save_atomic({"model": _on_cpu(state.best_model), "epoch": history.best_epoch,
                             "value": history.best_value}, ckpt_dir / "best.pt")
                best_saved = True
            state.save(ckpt_dir, train_loader)
            saved_at = time.monotonic()
        epoch_bar.update(1)
        epoch_bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.endswith("loss")})
    epoch_bar.close()

    if early_stopping is not None and early_stopping.restore_best and state.best_model is not None:
        model.load_state_dict(state.best_model)
    return history


def _lookup(record: Mapping[str, float], key: str) -> float:
    if key not in record:
        raise ValueError(f"monitored key {key!r} is not in the epoch record; available: {sorted(record)}")
    return float(record[key])


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------
def _default_predict(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)):
        return model(batch[0]), batch[1] if len(batch) > 1 else None
    return model(batch), None


def _concat(chunks: list[Any]) -> Any:
    """Concatenate per-batch outputs along dim 0, keeping tuple/list/dict structure."""
    first = chunks[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([c.reshape(1) if c.ndim == 0 else c for c in chunks])
    if isinstance(first, Mapping):
        return {k: _concat([c[k] for c in chunks]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(parts)) for parts in zip(*chunks, strict=True))
    raise TypeError(f"cannot concatenate predictions of type {type(first).__name__}")


def predict(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", fn: PredictFn | None = None
) -> tuple[Any, Any]:
    """Run ``model`` over ``loader`` in eval mode without gradients.

    Args:
        fn: ``fn(model, batch) -> (outputs, targets)``; the default takes ``model(batch[0])`` and ``batch[1]``
            for batches ``(x, y, ...)`` and ``model(batch), None`` for a bare tensor.

    Returns:
        ``(outputs, targets)`` concatenated along dim 0 on the CPU (``targets`` None when there are none).
    """
    device = torch.device(device)
    fn = fn or _default_predict
    model.to(device).eval()
    outputs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            out, tgt = fn(model, move_to_device(batch, device))
            outputs.append(move_to_device(out, "cpu"))
            targets.append(move_to_device(tgt, "cpu"))
    if not outputs:
        raise ValueError("predict got an empty loader")
    return _concat(outputs), _concat(targets)
