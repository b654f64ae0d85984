"""Template experiment glue (copy to ``mdbench/papers/<paper>/experiment.py``): a tiny CNN on synthetic textures, trained with the suite's one training loop and scored before and after training.

Every paper's ``experiment.py`` has this shape, so that its notebook is a sequence of calls:

- :class:`Config`: the notebook's parameters (``Config.from_params`` refuses a key it does not know);
- :func:`load_data`: the splits the run needs;
- :func:`run`: the method for one seed, its outputs on every test item (per-sample outputs, :mod:`mdbench.samples`);
- :func:`record`: the numbers computed from those outputs as records (a frame for
  :meth:`mdbench.notebook.Session.record_frame`, which keeps the outputs beside them as the records' samples);
- ``plot_*``: the figures.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from scipy.special import softmax
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import figures, metrics, samples, train
from mdbench.data.synthetic import SyntheticClassification
from mdbench.params import NotebookConfig
from mdbench.repro import seed_rngs

ROWS = ("untrained", "trained")


@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters (defaults: the method's recipe; the notebook's own values are the smoke ones)."""

    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 256
    n_test: int = 128
    image_size: int = 16
    epochs: int = 3
    lr: float = 0.003


@dataclass
class Data:
    """Train and test splits as tensors (images (N, 1, S, S) in [0, 1], labels (N,)) and the data's checksum."""

    train: TensorDataset
    test: TensorDataset
    name: str
    checksum: str


def load_data(cfg: Config) -> Data:
    """Two synthetic textures (``data_cards/synthetic_classification.md``) at ``cfg.image_size``."""
    splits = {}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        data = SyntheticClassification(n, num_classes=2, image_size=cfg.image_size, channels=1, seed=0, split=split)
        images, labels = zip(*(data[i] for i in range(n)), strict=True)
        splits[split] = TensorDataset(torch.stack(images), torch.tensor(labels))
    return Data(splits["train"], splits["test"], "synthetic", data.checksum)


def tiny_cnn(width: int = 8) -> nn.Module:
    """(B, 1, S, S) images -> (B, 2) logits: two convolution blocks (GroupNorm, which computes the same in training
    and evaluation), global average pooling, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 2))


def run(data: Data, cfg: Config, seed: int) -> pd.DataFrame:
    """The classifier of ``seed`` on every test image, before and after training: lines ``row, seed, unit, label,
    prob_0, prob_1`` (:func:`mdbench.samples.classifier_frame`; unit = the image's index in the test split, the
    same image in both rows)."""
    seed_rngs(seed)
    model = tiny_cnn()
    test = DataLoader(data.test, batch_size=256)

    def outputs(row: str) -> pd.DataFrame:
        logits, labels = train.predict(model, test, device=cfg.device)  # (N, 2), (N,)
        probs = softmax(logits.double().numpy(), axis=1)
        return samples.classifier_frame(seed, range(len(labels)), labels.numpy(), probs).assign(row=row)

    untrained = outputs("untrained")
    loader = DataLoader(data.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    train.fit(model, loader, loss_fn=nn.CrossEntropyLoss(), lr=cfg.lr, epochs=cfg.epochs, device=cfg.device,
              progress=False)
    return pd.concat([untrained, outputs("trained")], ignore_index=True)


def record(outputs: pd.DataFrame) -> pd.DataFrame:
    """Table 1's records: the test accuracy (%) of each (row, seed) of the classifier outputs of :func:`run`,
    computed from those outputs alone, so that they can go with the records as their ``samples``."""
    lines = []
    for (row, seed), own in outputs.groupby(["row", "seed"], sort=False):
        accuracy = metrics.classification_metrics(own["label"], own[samples.prob_columns(own)])["accuracy"]
        lines.append({"row": row, "metric": "accuracy", "seed": seed, "value": 100 * accuracy, "unit": "%"})
    return pd.DataFrame(lines)


@figures.styled
def plot_accuracy(frame: pd.DataFrame):
    """Each seed's accuracy per row (the frame of :func:`record`). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    for i, row in enumerate(ROWS):
        values = frame[frame.row == row].value
        ax.scatter([i] * len(values), values, color="black")
    names = figures.method_names("_template")
    ax.set_xticks(range(len(ROWS)), [figures.human(names, row) for row in ROWS])
    ax.set_ylabel("test accuracy (%)")
    return fig
