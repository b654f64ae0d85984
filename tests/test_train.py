"""The suite's training loop on a tiny separable problem: learning, early stopping, resume, atomic checkpoints."""
from __future__ import annotations

import collections
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import train as train_module
from mdbench.train import EarlyStopping, History, checkpointing, fit, move_to_device, predict, save_atomic


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """Two classes split by the line x0 + x1 = 0 in 4-D Gaussian points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def loader(ds: TensorDataset, shuffle: bool = True, generator_seed: int | None = None) -> DataLoader:
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    return DataLoader(ds, batch_size=16, shuffle=shuffle, generator=gen)


def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    logits, y = predict(model, loader(ds, shuffle=False))
    return (logits.argmax(1) == y).float().mean().item()


CE = nn.CrossEntropyLoss()


def test_fit_learns_separable_problem():
    ds = make_data()
    model = make_model()
    assert accuracy(model, ds) < 0.8  # the untrained model does not already solve it
    hist = fit(model, loader(ds), loader(make_data(32, seed=1), shuffle=False), loss_fn=CE, lr=1e-2, epochs=15,
               seed=0, progress=True, log_every=2)
    frame = hist.to_frame()
    assert list(frame["epoch"]) == list(range(1, 16))
    assert {"train_loss", "val_loss", "lr", "seconds", "step"} <= set(frame.columns)
    assert frame["train_loss"].iloc[-1] < 0.5 * frame["train_loss"].iloc[0]
    assert frame["val_loss"].iloc[-1] < frame["val_loss"].iloc[0]
    assert accuracy(model, ds) > 0.9 and accuracy(model, make_data(32, seed=1)) > 0.8  # chance is 0.5
    assert hist.global_step == 15 * 4 and hist.stop_reason == "epochs"
    assert [s["step"] for s in hist.steps] == list(range(2, 61, 2))


def test_early_stopping_stops_on_plateau_and_restores_best():
    ds = make_data()
    x, y = ds.tensors
    flipped = TensorDataset(x, 1 - y)  # val labels inverted: val loss rises as training succeeds
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(model, _loader, _device):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    model = make_model()
    hist = fit(model, loader(ds), loader(flipped, shuffle=False), loss_fn=CE, lr=1e-2, epochs=30, seed=0,
               early_stopping=EarlyStopping(monitor="val_loss", patience=3), eval_fn=snapshot, progress=False)
    frame = hist.to_frame()
    assert hist.stop_reason == "early_stopping"
    assert len(frame) == hist.best_epoch + 3 < 30
    assert hist.best_epoch == int(frame["val_loss"].idxmin()) + 1
    best, last = snapshots[hist.best_epoch], snapshots[len(frame)]
    weights = model.state_dict()
    assert all(torch.equal(weights[k], best[k]) for k in weights)
    assert not all(torch.equal(weights[k], last[k]) for k in weights)


@pytest.mark.parametrize("generator_seed", [None, 7], ids=["global-rng", "loader-generator"])
def test_resume_continues_and_matches_uninterrupted_run(tmp_path: Path, generator_seed):
    ds = make_data()

    def run(model: nn.Module, epochs: int, ckpt: Path | None) -> History:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return fit(model, loader(ds, generator_seed=generator_seed), loader(ds, shuffle=False), loss_fn=CE,
                   optimizer=opt, scheduler=sched, epochs=epochs, seed=3, checkpoint_dir=ckpt, progress=False)

    reference = make_model(dropout=0.3)  # dropout makes the RNG state matter, not only the data order
    full = run(reference, 4, None)

    first = run(make_model(dropout=0.3), 2, tmp_path)
    assert len(first.epochs) == 2 and (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    resumed_model = make_model(seed=99, dropout=0.3)  # other initial weights: all must come from last.pt
    resumed = run(resumed_model, 4, tmp_path)

    assert [r["epoch"] for r in resumed.epochs] == [1, 2, 3, 4]
    assert resumed.global_step == full.global_step == 4 * 4
    assert resumed.epochs[:2] == first.epochs  # the first two records come from the checkpoint
    for a, b in zip(resumed.epochs, full.epochs, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["lr"] == b["lr"]
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed_model.state_dict().items())

    again = run(make_model(seed=5, dropout=0.3), 4, tmp_path)  # a finished run is not trained further
    assert again.global_step == 16 and all(torch.equal(v, ref[k]) for k, v in resumed_model.state_dict().items())


class Interruption(Exception):
    pass


def stop_at_epoch(epoch: int):
    """An eval_fn that interrupts the run when it reaches ``epoch`` (before that epoch is checkpointed)."""
    seen = []

    def eval_fn(model, val_loader, device):
        seen.append(1)
        if len(seen) == epoch:
            raise Interruption
        return {}

    return eval_fn


def test_checkpoints_are_written_only_when_enough_time_has_passed(tmp_path: Path, monkeypatch):
    ds = make_data()
    fit(make_model(), loader(ds), loss_fn=CE, epochs=4, checkpoint_dir=tmp_path, checkpoint_every_s=3600,
        progress=False)
    assert list(tmp_path.iterdir()) == []  # a training shorter than the interval writes nothing
    clock = iter(range(0, 1000, 10))  # each of fit's readings of the clock 10 s after the last
    # only train.py's clock: other threads of the test process (e.g. a Dask cluster's) read time.monotonic too
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: float(next(clock)),
                                                              perf_counter=time.perf_counter))
    history = fit(make_model(), loader(ds), loss_fn=CE, epochs=4, checkpoint_dir=tmp_path, checkpoint_every_s=15,
                  progress=False)
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert len(last["history"]["epochs"]) == 4 and best["epoch"] == history.best_epoch  # written as one pair


def test_fits_inside_checkpointing_resume_in_call_order(tmp_path: Path):
    """Two trainings in a row, interrupted in the second and run again: the first is loaded, not repeated, and the
    second continues from its last epoch; the weights are those of an uninterrupted run."""
    ds = make_data()
    steps = collections.Counter()

    def count(name):
        def step(model, batch):
            steps[name] += model.training  # training steps, not validation ones
            x, y = batch
            return CE(model(x), y), {}
        return step

    def two_fits(eval_fn=None):
        first, second = make_model(seed=1, dropout=0.3), make_model(seed=2, dropout=0.3)
        fit(first, loader(ds, generator_seed=1), step_fn=count("first"), epochs=3, seed=1, progress=False)
        fit(second, loader(ds, generator_seed=2), loader(ds), step_fn=count("second"), epochs=3, seed=2,
            eval_fn=eval_fn, progress=False)
        return first, second

    reference = two_fits()
    steps.clear()
    with checkpointing(tmp_path, every_s=0), pytest.raises(Interruption):
        two_fits(stop_at_epoch(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-0", "fit-1"]
    assert steps == {"first": 12, "second": 12}
    steps.clear()
    with checkpointing(tmp_path, every_s=0):
        resumed = two_fits()
    assert steps == {"second": 4}  # the first training was loaded; the second repeated only its third epoch
    for model, ref in zip(resumed, reference, strict=True):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    fit(make_model(), loader(ds), loss_fn=CE, epochs=1, progress=False)  # outside the context: no checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-0", "fit-1"]


def test_save_atomic_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    target = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, target)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"epoch": 1}

    ckpt = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        fit(make_model(), loader(make_data()), loss_fn=CE, epochs=2, checkpoint_dir=ckpt, progress=False)
    assert list(ckpt.iterdir()) == []


def test_custom_step_fn_with_dict_batches():
    x, y = make_data().tensors

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"image": x[i], "label": y[i]}

    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        logits = model(batch["image"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return CE(logits, batch["label"]) + 0.0 * logits.pow(2).mean(), {"acc": acc}

    dl = DataLoader(DictData(), batch_size=16, shuffle=True)
    hist = fit(make_model(), dl, DataLoader(DictData(), batch_size=32), step_fn=step, lr=1e-2, epochs=3,
               progress=False)
    assert calls["n"] == 3 * 4 + 3 * 2  # train batches, then val batches each epoch
    frame = hist.to_frame()
    assert {"train_acc", "val_acc", "train_loss", "val_loss"} <= set(frame.columns)
    assert frame["train_acc"].between(0, 1).all() and frame["val_acc"].iloc[-1] > frame["val_acc"].iloc[0]


def test_max_steps_and_scheduler_lr_in_history():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hist = fit(model, loader(make_data()), loss_fn=CE, optimizer=opt, scheduler=sched, epochs=10, max_steps=10,
               progress=False)
    assert hist.global_step == 10 and hist.stop_reason == "max_steps"
    assert len(hist.epochs) == 3 and hist.epochs[-1]["step"] == 10  # 4 + 4 + 2 steps
    assert [r["lr"] for r in hist.epochs] == pytest.approx([0.1, 0.05, 0.025])

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fit(model, loader(make_data()), loss_fn=CE, optimizer=opt, scheduler=sched, scheduler_interval="step", epochs=1,
        progress=False)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)  # one step per batch

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # mode="max" on a falling train loss: every epoch after the first is "worse", so the lr halves each time
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
    hist = fit(model, loader(make_data()), loss_fn=CE, optimizer=opt, scheduler=plateau, epochs=3, progress=False)
    losses = [r["train_loss"] for r in hist.epochs]
    assert losses == sorted(losses, reverse=True)
    assert [r["lr"] for r in hist.epochs] == pytest.approx([0.1, 0.1, 0.05])


def test_predict_and_move_to_device():
    ds = make_data(40)
    model = make_model(dropout=0.5)
    out1, y = predict(model, loader(ds, shuffle=False))
    out2, _ = predict(model, loader(ds, shuffle=False))
    assert out1.shape == (40, 2) and torch.equal(y, ds.tensors[1]) and torch.equal(out1, out2)  # eval: no dropout
    assert not model.training
    outs, none = predict(model, DataLoader(ds.tensors[0], batch_size=16), fn=lambda m, b: ((m(b), b.sum(1)), None))
    assert outs[0].shape == (40, 2) and outs[1].shape == (40,) and none is None

    nested = {"a": (torch.ones(2), [torch.zeros(1), "text"]), "b": 3}
    moved = move_to_device(nested, "cpu")
    assert moved["b"] == 3 and moved["a"][1][1] == "text" and isinstance(moved["a"], tuple)
    counts = collections.defaultdict(int, {"n": torch.ones(1)})  # cannot be rebuilt as type(obj)(dict)
    assert torch.equal(move_to_device(counts, "cpu")["n"], torch.ones(1))


def test_copies_to_the_host_block_so_predict_never_returns_data_still_in_flight(monkeypatch):
    # Issue 15: a non-blocking device-to-host copy hands back a pinned buffer the GPU fills later, so predict's
    # labels were garbage on CUDA. Only CUDA shows the garbage; the flags of the copies show the bug on any machine.
    copies = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if len(args) != 1 or not isinstance(args[0], (str, torch.device)):  # Module.to's casts, not a copy
            return to(self, *args, **kwargs)
        copies.append((torch.device(args[0]).type, kwargs.get("non_blocking", False)))
        return to(self, *args, **kwargs) if copies[-1][0] == "cpu" else self  # no GPU needed to record one

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    ds = make_data(40)
    predict(make_model(), loader(ds, shuffle=False))
    move_to_device({"x": [torch.ones(2)]}, torch.device("cpu"))
    assert copies and all(not non_blocking for kind, non_blocking in copies if kind == "cpu"), copies
    copies.clear()
    move_to_device((torch.ones(2),), "cuda")
    assert copies[0] == ("cuda", True)  # to an accelerator the copy stays asynchronous


def test_bad_input_is_refused():
    ds, model = make_data(), make_model()
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fit(model, loader(ds), loss_fn=CE, epochs=0, progress=False)
    with pytest.raises(ValueError, match="train_loader is empty"):
        fit(model, DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long())), loss_fn=CE, epochs=1)
    with pytest.raises(ValueError, match="train_loader is empty"):
        fit(model, iter([]), loss_fn=CE, epochs=1, progress=False)  # no __len__: found while iterating
    with pytest.raises(ValueError, match="loss_fn"):
        fit(model, loader(ds), epochs=1, progress=False)
    with pytest.raises(ValueError, match="'train_acc' is not in the epoch record"):
        fit(model, loader(ds), loss_fn=CE, epochs=2, progress=False,
            early_stopping=EarlyStopping(monitor="train_acc", mode="max"))
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="amp"):
        fit(model, loader(ds), loss_fn=CE, epochs=1, amp="fp8", progress=False)
    with pytest.raises(ValueError, match="expects batches"):
        fit(model, DataLoader(ds.tensors[0], batch_size=8), loss_fn=CE, epochs=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(amp):
    ds = make_data()
    model = make_model()
    hist = fit(model, loader(ds), loss_fn=CE, lr=1e-2, epochs=10, device="cuda", amp=amp, grad_clip=1.0,
               progress=False)
    assert hist.epochs[-1]["train_loss"] < hist.epochs[0]["train_loss"]
    assert accuracy(model, ds) > 0.9
