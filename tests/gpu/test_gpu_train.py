"""The training loop on CUDA: predict's labels behind a long GPU queue (issue 15), and the quickstart's classifier
trained and scored with mixed precision against the same run on the CPU."""
from __future__ import annotations

import pytest
import torch
from gpu_compare import MARKS, assert_close, assert_same, assert_scores_close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import metrics, repro, train
from mdbench.data.synthetic import SyntheticClassification

pytestmark = MARKS


class SlowNet(nn.Module):
    """Tens of milliseconds of GPU work per batch, so the host reaches the end of predict long before the GPU."""

    def __init__(self, width: int = 2048, depth: int = 24) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = torch.tanh(x @ self.weight)
        return x[:, :4]


def test_predict_returns_the_dataset_labels_behind_a_long_gpu_queue():
    # Issue 15: the labels' copy back to the host was non-blocking, so predict read them before the GPU had
    # written them. Labels drawn from a huge range never match stale or zeroed memory by chance.
    torch.manual_seed(0)
    n, batch = 16 * 4096, 4096
    x = torch.randn(n, 2048)
    labels = torch.randint(1, 2**62, (n,))
    model = SlowNet().cuda()
    # Pinned blocks of the copies' sizes, filled with a sentinel and freed: the host allocator hands them out
    # again instead of allocating (an allocation may wait for the GPU and hide the race).
    warm = [torch.full((nbytes,), 255, dtype=torch.uint8, pin_memory=True)
            for nbytes in (batch * 8, batch * 4 * 4) for _ in range(2 * n // batch)]  # int64 labels, (B, 4) floats
    del warm
    outputs, targets = train.predict(model, DataLoader(TensorDataset(x, labels), batch_size=batch), "cuda")
    assert_same(targets, labels, "labels")
    with torch.no_grad():
        expected = torch.cat([model(chunk.cuda()).cpu() for chunk in x.split(batch)])
    assert outputs.device.type == "cpu" and outputs.dtype == torch.float32
    assert_close(outputs, expected, 1e-5, "outputs")


def small_cnn(num_classes: int, in_channels: int = 1, width: int = 16) -> nn.Module:
    """The quickstart notebook's CNN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def _tensors(split: str, n: int) -> TensorDataset:
    data = SyntheticClassification(n, num_classes=2, image_size=28, channels=1, seed=0, split=split)
    images, labels = zip(*(data[i] for i in range(n)), strict=True)
    return TensorDataset(torch.stack(images), torch.tensor(labels))


def _quickstart(device: str, amp) -> tuple[train.History, torch.Tensor, torch.Tensor]:
    generator = repro.seed_everything(0)
    net = small_cnn(2)
    loader = DataLoader(_tensors("train", 256), batch_size=32, shuffle=True, generator=generator)
    val = DataLoader(_tensors("val", 64), batch_size=64)
    history = train.fit(net, loader, val, loss_fn=nn.CrossEntropyLoss(), lr=3e-3, epochs=2, device=device,
                        amp=amp, progress=False)
    logits, labels = train.predict(net, DataLoader(_tensors("test", 256), batch_size=100), device)
    return history, logits, labels


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_quickstart_classifier_trains_and_scores_alike_on_cuda(amp):
    cpu_history, cpu_logits, cpu_labels = _quickstart("cpu", False)
    history, logits, labels = _quickstart("cuda", amp)
    assert_same(labels, _tensors("test", 256).tensors[1], "test labels")
    assert_same(labels, cpu_labels, "test labels against the CPU's")
    assert logits.dtype == cpu_logits.dtype == torch.float32
    for key in ("train_loss", "val_loss"):
        assert_close([r[key] for r in history.epochs], [r[key] for r in cpu_history.epochs], 0.05, key)
    assert_close(logits, cpu_logits, 0.1, "test logits")
    scores = metrics.classification_metrics(labels, logits, scores_are="logits")
    cpu_scores = metrics.classification_metrics(cpu_labels, cpu_logits, scores_are="logits")
    assert_scores_close({k: 100 * scores[k] for k in ("accuracy", "auc")},
                        {k: 100 * cpu_scores[k] for k in ("accuracy", "auc")}, 0.05, 100 / len(labels), "quickstart")


def test_best_weights_stay_on_the_gpu_and_are_written_to_best_pt_from_the_host(tmp_path, monkeypatch):
    # fit snapshots the weights of every improving epoch where they are (no wait for the GPU, no trip through the
    # host); best.pt still holds CPU tensors, and restore_best loads the best epoch's weights back
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = nn.Linear(4, 2).cuda()
    snapshots = []
    snapshot = train._snapshot

    def recording(module):
        snapshots.append(snapshot(module))
        return snapshots[-1]

    monkeypatch.setattr(train, "_snapshot", recording)
    history = train.fit(model, DataLoader(TensorDataset(x, y), batch_size=16), loss_fn=nn.functional.cross_entropy,
                        lr=0.1, epochs=4, device="cuda", checkpoint_dir=tmp_path, progress=False,
                        early_stopping=train.EarlyStopping(monitor="train_loss", patience=10))
    assert snapshots and all(v.device.type == "cuda" for s in snapshots for v in s.values())
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in best["model"].values()) and best["epoch"] == history.best_epoch
    assert all(torch.equal(v.cpu(), best["model"][k]) for k, v in model.state_dict().items())
