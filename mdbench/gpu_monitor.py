"""How busy the GPU is while a block of code runs: a benchmark read-out printed beside a notebook cell, never a
number a record or a claim rests on.

``nvidia-smi`` is sampled from a background thread (``utilization.gpu``: the share of the last sample period in
which a kernel ran; ``memory.used``), the same counters the gpu profile's launch script traces every 5 s for the
whole run, here for one cell::

    with GPUMonitor(cfg.device) as gpu:
        runs = ...
    gpu.report("experiments")   # GPU utilisation over experiments: mean 71 % (peak 100 %), 183 samples, ...

On a device that is not CUDA, or where ``nvidia-smi`` cannot be run, nothing is sampled and ``report`` prints
nothing, so that a CPU run's output does not change.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from types import TracebackType

import torch

__all__ = ["GPUMonitor"]


def _smi_id(device: torch.device) -> str:
    """The GPU of ``device`` as nvidia-smi names it: its entry of CUDA_VISIBLE_DEVICES (an index or a UUID, which
    ``nvidia-smi -i`` takes either way), else its index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


@dataclass
class GPUMonitor:
    """Samples the GPU of ``device`` every ``interval_s`` seconds while its ``with`` block runs.

    ``utilisation`` (%) and ``memory_mib`` hold one value per sample; ``mean`` and ``peak`` summarise them
    (None without samples).
    """

    device: str | torch.device
    interval_s: float = 1.0
    utilisation: list[float] = field(default_factory=list)
    memory_mib: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Whether this block is sampled: a CUDA device and nvidia-smi on the path."""
        return torch.device(self.device).type == "cuda" and shutil.which("nvidia-smi") is not None

    def _sample(self, gpu: str) -> None:
        command = ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                line = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
                busy, memory = (float(v) for v in line.strip().splitlines()[0].split(","))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return  # no reading this time means none later either: stop, leave what was sampled
            self.utilisation.append(busy)
            self.memory_mib.append(memory)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GPUMonitor:
        if self.active:
            device = torch.device(self.device)
            self._thread = threading.Thread(target=self._sample, args=(_smi_id(device),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        """Mean utilisation (%) over the samples."""
        return sum(self.utilisation) / len(self.utilisation) if self.utilisation else None

    @property
    def peak(self) -> float | None:
        """Highest utilisation (%) sampled."""
        return max(self.utilisation, default=None)

    def report(self, what: str) -> None:
        """Print the mean and peak utilisation and the peak memory over the block (nothing without samples)."""
        if self.utilisation:
            print(f"GPU utilisation over {what}: mean {self.mean:.0f} % (peak {self.peak:.0f} %), "
                  f"{len(self.utilisation)} samples every {self.interval_s:g} s; memory peak "
                  f"{max(self.memory_mib) / 1024:.1f} GiB")
