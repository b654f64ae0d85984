"""Efficiency protocol: parameters, FLOPs, latency, peak memory, and ONNX Runtime / OpenVINO export with parity.

Every number carries the conditions it was measured under (input shapes, threads, device, method), so a
results record can state them beside the value. Exported models enter a table only through
:func:`export_with_parity`, which raises :class:`ParityError` when the export disagrees with PyTorch.

Inputs (``Inputs``) are one tensor or a tuple/list of positional tensors, e.g. a ``(B, C, H, W)`` image batch.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Inputs = torch.Tensor | Sequence[torch.Tensor]
# what measure_latency passes on: a plain callable (an exported model) may take numpy arrays
LatencyInputs = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]
BACKENDS = ("onnxruntime", "openvino")


class ParityError(RuntimeError):
    """An exported model's outputs disagree with the PyTorch model's beyond the tolerances."""


class _AsDict:
    def as_dict(self) -> dict[str, Any]:
        return asdict(cast("DataclassInstance", self))  # a mixin of the report dataclasses only


# --------------------------------------------------------------------------------------------- helpers


def _as_args(inputs: LatencyInputs) -> tuple:
    """One tensor or array, or a tuple/list of them, as a tuple of positional arguments."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs)
    raise ValueError(
        f"example inputs must be a tensor or a non-empty tuple/list of tensors, got {type(inputs).__name__}"
    )


def _shapes(args: Iterable) -> list[tuple[int, ...]]:
    return [tuple(int(s) for s in a.shape) for a in args if hasattr(a, "shape")]


def _shape_str(shapes: Sequence[tuple[int, ...]]) -> str:
    """``[(1, 3, 224, 224)]`` -> ``"1x3x224x224"``; several inputs are joined with commas."""
    return ",".join("x".join(str(d) for d in s) for s in shapes)


def _module_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _flatten_outputs(out: Any) -> list[np.ndarray]:
    """Model outputs (tensor, array, tuple/list or dict of them) as a flat list of float arrays."""
    if isinstance(out, dict):
        out = list(out.values())
    if not isinstance(out, (tuple, list)):
        out = [out]
    arrays = []
    for o in out:
        if isinstance(o, torch.Tensor):
            o = o.detach().cpu().numpy()
        arrays.append(np.asarray(o))
    return arrays


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    """Eval mode and no autograd for the duration; every submodule's training flag is restored afterwards.

    Restoring only the root's flag would put, e.g., a deliberately frozen BatchNorm back into train mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class ParamCount(_AsDict):
    """Parameter counts: ``total``, ``trainable`` (requires_grad) and ``deployed`` (what inference needs)."""

    total: int
    trainable: int
    deployed: int


def count_parameters(
    model: nn.Module, deployed_modules: nn.Module | Sequence[nn.Module] | None = None
) -> ParamCount:
    """Count the parameters of ``model``; shared (tied) parameters are counted once.

    ``deployed_modules``: the submodule(s) that inference runs (e.g. the student without a distillation
    head); default: the whole model.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if deployed_modules is None:
        deployed = total
    else:
        modules = [deployed_modules] if isinstance(deployed_modules, nn.Module) else list(deployed_modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("deployed_modules must be an nn.Module or a non-empty list of nn.Modules")
        unique = {id(p): p for m in modules for p in m.parameters()}
        deployed = sum(p.numel() for p in unique.values())
    return ParamCount(total=total, trainable=trainable, deployed=deployed)


# ----------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopReport(_AsDict):
    """FLOPs of one forward pass (2 x multiply-accumulates, as ``FlopCounterMode`` counts them).

    Only matmul/conv-like ops are counted; bias additions, activations and normalisations are not.
    ``by_module`` maps hierarchical module names (``"Sequential.0"``) to their FLOPs.
    """

    flops: int
    input_shapes: list[tuple[int, ...]]
    by_module: dict[str, int] = field(default_factory=dict)


def count_flops(model: nn.Module, example_inputs: Inputs) -> FlopReport:
    """FLOPs of ``model(*example_inputs)`` in eval mode under ``torch.no_grad`` (training flag restored).

    Inputs are moved to the model's device. Per-sample FLOPs: divide by the batch size yourself.
    """
    args = _to_device(_as_args(example_inputs), _module_device(model))
    counter = FlopCounterMode(display=False)
    with _eval_no_grad(model), counter:
        model(*args)
    by_module = {
        name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items() if name != "Global"
    }
    return FlopReport(flops=int(counter.get_total_flops()), input_shapes=_shapes(args), by_module=by_module)


# --------------------------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyReport(_AsDict):
    """Wall-clock latency of one call, in milliseconds, over ``n`` timed repeats after warm-up; ``times_ms``: each
    repeat's time in the order taken (repeat r of every call of one :func:`measure_latencies` shares a round)."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    n: int
    warmup: int
    threads: int
    device: str
    input_shapes: list[tuple[int, ...]]
    times_ms: tuple[float, ...] = ()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _infer_device(fn: Callable, args: tuple, device: str | torch.device | None) -> torch.device:
    if isinstance(fn, nn.Module):
        own = _module_device(fn)
        if device is not None and torch.device(device).type != own.type:
            raise ValueError(f"device={device!r} but the model's parameters are on {own}; move the model first")
        return own
    if device is not None:
        return torch.device(device)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first.device if first is not None else torch.device("cpu")


def measure_latencies(
    calls: Mapping[str, tuple[Callable | nn.Module, LatencyInputs]],
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
) -> dict[str, LatencyReport]:
    """Time each ``name: (fn_or_model, example_inputs)`` of ``calls``: ``warmup`` untimed calls of each, then
    ``repeats`` rounds, each of which times every call once, in order, right after an untimed call of the same
    (where there are several calls).

    Interleaved rounds make repeat r of two calls a pair: a change of the machine's load between rounds slows both
    alike and cancels in their paired difference (:mod:`mdbench.verdicts` pairs repeats by id), which timing one
    call's repeats after the other's would leave in. The untimed call before each timed one keeps what a timed
    call measures the same as when one model is timed alone: a call that follows a call of the same model, its
    weights in cache (a small model timed right after a large one was measured ~20 % slower on a 2-core CPU,
    from the other's weights evicting its own). A module runs in eval mode under ``torch.no_grad`` (training
    flags restored) on its own device; torch inputs are moved there. A plain callable (e.g.
    :class:`OnnxRuntimeModel`) gets the inputs as they are. On CUDA each call is bracketed by
    ``torch.cuda.synchronize`` so the time covers the kernels, not just their launch. ``threads`` is the
    callable's ``num_threads`` attribute when it has one (exported wrappers), else ``torch.get_num_threads()``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if not calls:
        raise ValueError("measure_latencies needs at least one call to time")
    prepared = {}
    for name, (fn, inputs) in calls.items():
        if not callable(fn):
            raise ValueError(f"{name or 'fn_or_model'} must be callable, got {type(fn).__name__}")
        args = _as_args(inputs)
        dev = _infer_device(fn, args, device)
        if isinstance(fn, nn.Module) or device is not None:
            args = _to_device(args, dev)
        prepared[name] = (fn, args, dev)
    times_ms: dict[str, list[float]] = {name: [] for name in calls}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for fn, _, _ in prepared.values():
            if isinstance(fn, nn.Module):
                stack.enter_context(_eval_no_grad(fn))
        for fn, args, _ in prepared.values():
            for _ in range(warmup):
                fn(*args)
        for _ in range(repeats):
            for name, (fn, args, dev) in prepared.items():
                if len(prepared) > 1:
                    fn(*args)  # untimed: the timed call finds its own weights in cache, not another model's
                _synchronize(dev)
                start = time.perf_counter()
                fn(*args)
                _synchronize(dev)
                times_ms[name].append((time.perf_counter() - start) * 1e3)
    return {name: LatencyReport(
        median_ms=float(np.median(times_ms[name])),
        p90_ms=float(np.percentile(times_ms[name], 90)),
        mean_ms=float(statistics.fmean(times_ms[name])),
        n=repeats,
        warmup=warmup,
        threads=int(getattr(fn, "num_threads", torch.get_num_threads())),
        device=str(dev),
        input_shapes=_shapes(args),
        times_ms=tuple(times_ms[name]),
    ) for name, (fn, args, dev) in prepared.items()}


def measure_latency(
    fn_or_model: Callable | nn.Module,
    example_inputs: LatencyInputs,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
) -> LatencyReport:
    """Time ``fn_or_model(*example_inputs)``: ``warmup`` untimed calls, then ``repeats`` timed ones
    (:func:`measure_latencies` of this one call)."""
    return measure_latencies({"": (fn_or_model, example_inputs)}, warmup=warmup, repeats=repeats, device=device)[""]


# ---------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryReport(_AsDict):
    """Peak memory during one call, in bytes.

    ``baseline_bytes`` is the level just before the call, ``peak_bytes`` the highest level during it, and
    ``delta_bytes`` their difference (what the call itself added). ``method`` names what was measured.
    """

    peak_bytes: int
    baseline_bytes: int
    device: str
    method: str

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta_bytes": self.delta_bytes, "peak_mb": self.peak_mb}


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        _PROC_CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (man 5 proc)
        return True
    except OSError:
        return False


def _rss_high_water_mark() -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no VmHWM line in {_PROC_STATUS}")


def _peak_rss_sampled(fn: Callable[[], Any], interval_s: float) -> int:
    """Peak RSS seen by a background thread polling psutil every ``interval_s`` while ``fn`` runs.

    Polling can miss spikes shorter than the interval; used only where the kernel counter is unavailable.
    """
    process = psutil.Process()
    peak = process.memory_info().rss
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, process.memory_info().rss)


def peak_memory(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    cpu_method: str = "auto",
    interval_s: float = 0.001,
) -> MemoryReport:
    """Peak memory while ``fn()`` runs.

    What is measured:

    - CUDA: bytes held by PyTorch tensors on that GPU (``torch.cuda.max_memory_allocated`` after
      ``reset_peak_memory_stats``); not the caching allocator's reserve, not other libraries' allocations.
      ``method="cuda_max_memory_allocated"``.
    - CPU: resident set size (RSS) of the whole process, all threads and libraries included (ONNX Runtime,
      OpenVINO). ``cpu_method="hwm"`` resets and reads the kernel's exact high-water mark (Linux VmHWM);
      ``"sampling"`` polls RSS with psutil from a background thread every ``interval_s`` seconds (can miss
      very short spikes); ``"auto"`` uses ``"hwm"`` where the kernel allows it, else ``"sampling"``.
      ``resource.getrusage`` is not used: its ``ru_maxrss`` is the process-lifetime peak and cannot be reset.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = int(torch.cuda.max_memory_allocated(dev))
        return MemoryReport(peak, int(baseline), str(dev), "cuda_max_memory_allocated")
    if dev.type != "cpu":
        raise ValueError(f"peak_memory supports 'cpu' and 'cuda' devices, got {device!r}")
    if cpu_method not in ("auto", "hwm", "sampling"):
        raise ValueError(f"cpu_method must be 'auto', 'hwm' or 'sampling', got {cpu_method!r}")
    baseline = psutil.Process().memory_info().rss
    if cpu_method != "sampling" and sys.platform.startswith("linux") and _reset_rss_high_water_mark():
        fn()
        return MemoryReport(_rss_high_water_mark(), int(baseline), "cpu", "rss_high_water_mark")
    if cpu_method == "hwm":
        raise RuntimeError(f"cannot reset the peak-RSS counter via {_PROC_CLEAR_REFS}; use cpu_method='sampling'")
    return MemoryReport(_peak_rss_sampled(fn, interval_s), int(baseline), "cpu", "rss_sampling")


# ---------------------------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``model`` to ONNX with the TorchScript exporter; inputs are named ``input_0..``, outputs ``output_0..``.

    ``dynamic_batch`` makes dimension 0 of every input and output symbolic. The dynamo exporter (the torch
    default) needs onnxscript, which the suite does not ship, hence ``dynamo=False``.
    """
    args = _to_device(_as_args(example_inputs), _module_device(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_no_grad(model):
        n_outputs = len(_flatten_outputs(model(*args)))
        input_names = [f"input_{i}" for i in range(len(args))]
        output_names = [f"output_{i}" for i in range(n_outputs)]
        dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
        with warnings.catch_warnings():
            # The legacy exporter warns that it is legacy; that choice is deliberate (see docstring).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            )
    return path


def _numpy_inputs(inputs: tuple) -> list[np.ndarray]:
    return [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in inputs]


def _single_or_tuple(outputs: list[np.ndarray]) -> np.ndarray | tuple[np.ndarray, ...]:
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


class OnnxRuntimeModel:
    """An ONNX file run by ONNX Runtime on CPU; call with numpy arrays or torch tensors, get numpy back.

    ``num_threads`` (default ``torch.get_num_threads()``) sets intra-op threads, so latencies compare with
    PyTorch's at equal threads. One output returns an array, several a tuple.
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.num_threads = num_threads or torch.get_num_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path} expects {len(self.input_names)} inputs, got {len(inputs)}")
        feeds = dict(zip(self.input_names, _numpy_inputs(inputs), strict=True))
        return _single_or_tuple(self.session.run(None, feeds))


class OpenVinoModel:
    """An ONNX file converted by ``openvino.convert_model`` and compiled for OpenVINO's CPU plugin.

    Converting from the ONNX file (rather than tracing the torch model again) keeps one export path for
    both backends and keeps the dynamic batch axis. Inference precision is pinned to f32: the CPU plugin
    would otherwise pick bf16 on CPUs that support it, which breaks parity. Call with numpy arrays or torch
    tensors; one output returns an array, several a tuple.
    """

    backend = "openvino"

    def __init__(self, onnx_path: str | Path, num_threads: int | None = None):
        import openvino as ov

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.num_threads = num_threads or torch.get_num_threads()
        config = {
            ov.properties.inference_num_threads(): self.num_threads,
            ov.properties.hint.inference_precision(): ov.Type.f32,
        }
        self.compiled = ov.Core().compile_model(ov.convert_model(str(self.path)), "CPU", config)
        self.n_inputs = len(self.compiled.inputs)

    def __call__(self, *inputs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        if len(inputs) != self.n_inputs:
            raise ValueError(f"{self.path} expects {self.n_inputs} inputs, got {len(inputs)}")
        result = self.compiled(_numpy_inputs(inputs))
        return _single_or_tuple([np.asarray(result[out]) for out in self.compiled.outputs])


# ---------------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class ParityReport(_AsDict):
    """Agreement of an exported model with PyTorch over one or more input sets.

    Each output is judged against its own scale, ``max|torch output|``: it passes when
    ``max|torch - exported| <= atol + rtol * scale``. An absolute tolerance alone would depend on the output's
    magnitude, and for FP32 exports the differences (float summation order of the backends' kernels) grow with it.

    ``max_abs_diff``: largest absolute difference over all outputs (inf when shapes differ).
    ``max_rel_diff``: largest ``max|torch - exported| / scale`` over all outputs (inf when shapes differ).
    ``agreement``: fraction of predictions that match: argmax along ``class_dim``, or ``output > threshold``
    when a threshold is given. ``passed``: every output within its tolerance and ``agreement >= min_agreement``.
    """

    max_abs_diff: float
    max_rel_diff: float
    agreement: float
    passed: bool
    atol: float
    rtol: float
    min_agreement: float
    input_shapes: list[list[tuple[int, ...]]]
    torch_output_shapes: list[list[tuple[int, ...]]]
    exported_output_shapes: list[list[tuple[int, ...]]]

    def describe(self) -> str:
        """The differences beside their tolerances, for error messages."""
        return (f"max_abs_diff={self.max_abs_diff:.3g}, max_rel_diff={self.max_rel_diff:.3g} of the output's scale "
                f"max|torch| (allowed: atol {self.atol:g} + rtol {self.rtol:g} x scale), "
                f"agreement={self.agreement:.4f} (min {self.min_agreement:g})")


def _predictions(output: np.ndarray, class_dim: int, threshold: float | None) -> np.ndarray:
    if threshold is not None or output.ndim <= class_dim or output.shape[class_dim] == 1:
        return output > (0.0 if threshold is None else threshold)
    return output.argmax(axis=class_dim)


def compare_outputs(
    reference: Any,
    candidate: Any,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    min_agreement: float = 1.0,
    class_dim: int = 1,
    threshold: float | None = None,
    input_shapes: Sequence[tuple[int, ...]] = (),
) -> ParityReport:
    """Compare PyTorch's outputs (``reference``) with an export's (``candidate``) output by output.

    Both are a tensor/array or a tuple/list/dict of them. Each output passes when
    ``max|reference - candidate| <= atol + rtol * max|reference|``. Outputs with no or a size-1 ``class_dim``
    (e.g. a ``(B,)`` or ``(B, 1)`` score) are compared as ``output > 0`` (logits) unless ``threshold`` is given;
    with ``threshold`` every output is compared thresholded (e.g. segmentation probabilities). A shape mismatch
    fails the check. ``input_shapes`` is only recorded.
    """
    reference, candidate = _flatten_outputs(reference), _flatten_outputs(candidate)
    shapes_ref, shapes_exp = _shapes(reference), _shapes(candidate)
    if shapes_ref != shapes_exp:
        max_abs, max_rel, agreement, within = float("inf"), float("inf"), 0.0, False
    else:
        pairs = list(zip(reference, candidate, strict=True))
        abs_diffs = np.array([np.max(np.abs(r.astype(np.float64) - c), initial=0.0) for r, c in pairs])
        scales = np.array([np.max(np.abs(r.astype(np.float64)), initial=0.0) for r, _ in pairs])
        # an all-zero reference has no scale: matched exactly it is 0 off, else infinitely
        rel_diffs = [d / s if s > 0 else (np.inf if d > 0 else 0.0) for d, s in zip(abs_diffs, scales, strict=True)]
        max_abs, max_rel = float(np.max(abs_diffs)), float(np.max(rel_diffs))
        within = bool(np.all(abs_diffs <= atol + rtol * scales))
        matches = [_predictions(r, class_dim, threshold) == _predictions(c, class_dim, threshold) for r, c in pairs]
        agreement = float(np.concatenate([m.ravel() for m in matches]).mean())
    return ParityReport(
        max_abs_diff=max_abs, max_rel_diff=max_rel, agreement=agreement,
        passed=within and agreement >= min_agreement, atol=atol, rtol=rtol, min_agreement=min_agreement,
        input_shapes=[list(input_shapes)], torch_output_shapes=[shapes_ref], exported_output_shapes=[shapes_exp],
    )


def check_parity(
    torch_model: nn.Module,
    exported: Callable,
    inputs: Inputs,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    min_agreement: float = 1.0,
    class_dim: int = 1,
    threshold: float | None = None,
) -> ParityReport:
    """Compare ``torch_model(*inputs)`` (eval, no_grad) with ``exported(*inputs)``: :func:`compare_outputs`.

    The defaults suit FP32 exports: their differences from PyTorch are float rounding, typically 1e-7 to 1e-5 of
    the output's scale, so ``rtol=1e-3`` leaves ample room across CPUs and thread counts and still catches a wrong
    graph or weight.
    """
    args = _as_args(inputs)
    with _eval_no_grad(torch_model):
        reference = torch_model(*_to_device(args, _module_device(torch_model)))
    return compare_outputs(reference, exported(*args), atol=atol, rtol=rtol, min_agreement=min_agreement,
                           class_dim=class_dim, threshold=threshold, input_shapes=_shapes(args))


def _combine(reports: Sequence[ParityReport]) -> ParityReport:
    """The worst case over several input sets: largest differences, lowest agreement, all must pass."""
    return ParityReport(
        max_abs_diff=float(np.max([r.max_abs_diff for r in reports])),
        max_rel_diff=float(np.max([r.max_rel_diff for r in reports])),
        agreement=min(r.agreement for r in reports),
        passed=all(r.passed for r in reports),
        atol=reports[0].atol,
        rtol=reports[0].rtol,
        min_agreement=reports[0].min_agreement,
        input_shapes=[s for r in reports for s in r.input_shapes],
        torch_output_shapes=[s for r in reports for s in r.torch_output_shapes],
        exported_output_shapes=[s for r in reports for s in r.exported_output_shapes],
    )


def _other_batch(args: tuple) -> tuple:
    """The inputs with batch size 2B and fresh values in the second half: exercises the dynamic batch axis."""
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.cat([a, torch.randn(a.shape, generator=generator, dtype=a.dtype).to(a.device)])
        if a.is_floating_point() else torch.cat([a, a])
        for a in args
    )


def export_with_parity(
    model: nn.Module,
    example_inputs: Inputs,
    backend: str = "onnxruntime",
    workdir: str | Path = ".",
    atol: float = 1e-5,
    rtol: float = 1e-3,
    min_agreement: float = 1.0,
    dynamic_batch: bool = True,
    parity_inputs: Sequence[Inputs] | None = None,
    class_dim: int = 1,
    threshold: float | None = None,
    num_threads: int | None = None,
    name: str = "model",
) -> tuple[OnnxRuntimeModel | OpenVinoModel, ParityReport]:
    """Export ``model`` to ``workdir/<name>.onnx``, load it with ``backend``, and check parity with PyTorch.

    Parity is checked on each input set in ``parity_inputs`` (default: ``example_inputs`` and, with
    ``dynamic_batch``, a batch twice as large) with :func:`check_parity`: each output within
    ``atol + rtol * max|torch output|``. Returns ``(exported_model, worst-case ParityReport)``.

    Raises:
        ValueError: unknown ``backend``.
        ParityError: the export disagrees with PyTorch beyond ``atol`` / ``rtol`` / ``min_agreement``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown export backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    args = _as_args(example_inputs)
    onnx_path = export_onnx(model, args, Path(workdir) / f"{name}.onnx", dynamic_batch=dynamic_batch)
    wrapper = OnnxRuntimeModel if backend == "onnxruntime" else OpenVinoModel
    exported = wrapper(onnx_path, num_threads=num_threads)
    if parity_inputs is None:
        parity_inputs = [args, _other_batch(args)] if dynamic_batch else [args]
    report = _combine([
        check_parity(model, exported, inputs, atol=atol, rtol=rtol, min_agreement=min_agreement, class_dim=class_dim,
                     threshold=threshold)
        for inputs in parity_inputs
    ])
    if not report.passed:
        raise ParityError(
            f"{backend} export {onnx_path} fails parity with PyTorch: {report.describe()}; "
            f"output shapes torch {report.torch_output_shapes} vs exported {report.exported_output_shapes}"
        )
    return exported, report


# --------------------------------------------------------------------------------------------- summary


def efficiency_summary(
    model: nn.Module,
    example_inputs: Inputs,
    deployed_modules: nn.Module | Sequence[nn.Module] | None = None,
    warmup: int = 5,
    repeats: int = 30,
) -> dict[str, Any]:
    """Parameters, FLOPs and latency of ``model`` on ``example_inputs`` as one flat dict for a results record.

    Keys: params_total, params_trainable, params_deployed, flops, input_shape (``"BxCxHxW"``),
    latency_ms_median, latency_ms_p90, latency_ms_mean, latency_n, threads, device.
    """
    params = count_parameters(model, deployed_modules)
    flops = count_flops(model, example_inputs)
    latency = measure_latency(model, example_inputs, warmup=warmup, repeats=repeats)
    return {
        "params_total": params.total,
        "params_trainable": params.trainable,
        "params_deployed": params.deployed,
        "flops": flops.flops,
        "input_shape": _shape_str(flops.input_shapes),
        "latency_ms_median": latency.median_ms,
        "latency_ms_p90": latency.p90_ms,
        "latency_ms_mean": latency.mean_ms,
        "latency_n": latency.n,
        "threads": latency.threads,
        "device": latency.device,
    }


def deployment_costs(models: Mapping[str, nn.Module], example: torch.Tensor, latency_repeats: int = 10
                     ) -> list[dict[str, Any]]:
    """Deployed parameters, FLOPs and CPU latency of each of ``models`` on the one input ``example`` (e.g.
    (1, 3, 256, 256)), all timed in the same rounds (:func:`measure_latencies`), so that repeat r of two models is
    a pair for a paired verdict.

    Returns:
        One dict per model, in order: ``model`` (its key), ``params`` (deployed), ``flops``, ``latency_ms``
        (median), ``latency_p90_ms``, ``latency_times_ms`` (each repeat's), ``threads``, ``input_shape``
        (``"1x3x256x256"``).
    """
    latency = measure_latencies({name: (model, example) for name, model in models.items()}, warmup=1,
                                repeats=latency_repeats)
    shape = "x".join(str(n) for n in example.shape)
    return [{"model": name, "params": count_parameters(model).deployed, "flops": count_flops(model, example).flops,
             "latency_ms": latency[name].median_ms, "latency_p90_ms": latency[name].p90_ms,
             "latency_times_ms": latency[name].times_ms, "threads": latency[name].threads, "input_shape": shape}
            for name, model in models.items()]


def cost_records(costs: Iterable[Any], config_of: Callable[[Any], dict[str, Any]], notes_of: Callable[[Any], str],
                 dataset: str) -> tuple[Any, Any]:
    """The records of :func:`deployment_costs` (as rows with those attributes, e.g. a DataFrame's ``itertuples()``):
    ``params_m`` (M), ``gflops`` and ``latency_ms`` (ms) of each model under ``dataset`` (its checksum: "random
    input"), with ``config_of(row)`` and ``notes_of(row)``; and the per-sample outputs of ``latency_ms`` (the median
    of its repeats), one line per repeat (``row, seed, unit, metric, value``; unit ``rep00``, ``rep01``, … shared by
    the models timed in one round), for ``Session.record_frame(..., aggregate="median")``. Two DataFrames."""
    import pandas as pd

    from mdbench.samples import repeat_units

    lines, repeats = [], []
    for cost in costs:
        config, notes = config_of(cost), notes_of(cost)
        for metric, value, unit in (("params_m", cost.params / 1e6, "M"), ("gflops", cost.flops / 1e9, "GFLOPs"),
                                    ("latency_ms", cost.latency_ms, "ms")):
            lines.append({"row": cost.model, "metric": metric, "value": value, "unit": unit, "config": config,
                          "notes": notes})
        repeats.append(pd.DataFrame({"row": cost.model, "seed": 0, "metric": "latency_ms",
                                     "unit": repeat_units(len(cost.latency_times_ms)), "value": cost.latency_times_ms}))
    return (pd.DataFrame(lines).assign(dataset=dataset, dataset_checksum="random input"),
            pd.concat(repeats, ignore_index=True))
