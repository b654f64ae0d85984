"""EFCM on CUDA with mixed precision against the CPU: cached teacher features, stage-1 distillation, the MIL heads,
Reuse / Retrain / end-to-end CLAM, and bag prediction."""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from gpu_compare import MARKS, assert_close, assert_rows_aligned, assert_same, assert_same_scale, full_fp32

from mdbench.data.synthetic import SyntheticMILBags
from mdbench.models import build_model, freeze
from mdbench.papers.efcm import experiment as efcm
from mdbench.repro import seed_rngs

pytestmark = MARKS
warnings.filterwarnings("ignore", message="no local pretrained weights")


def _bags(n: int, split: str) -> list:
    data = SyntheticMILBags(n, bag_size=(4, 6), instances="images", image_size=16, seed=0, split=split)
    return [data[i] for i in range(n)]


def test_teacher_features_alike_on_cuda_under_autocast():
    seed_rngs(0)
    teacher = freeze(efcm.PatchEncoder(build_model("timm:resnet10t", pretrained=False, num_classes=0)))
    patches = torch.cat([b[0] for b in _bags(8, "train")])
    cpu = efcm.teacher_features(teacher, patches, name="t", amp=False, device="cpu", cache=False)
    with full_fp32():
        fp32 = efcm.teacher_features(teacher, patches, name="t", amp=False, device="cuda", cache=False)
    assert fp32.device.type == "cpu" and fp32.dtype == cpu.dtype == torch.float32
    assert_close(fp32, cpu, 1e-3, "teacher features (fp32 on both)")
    # bf16 autocast rounds every layer's inputs differently on each device: features agree in direction
    gpu = efcm.teacher_features(teacher, patches, name="t", amp=True, device="cuda", cache=False)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert_rows_aligned(gpu, cpu, 0.99, "teacher features (bf16 autocast on CUDA)")
    # compiled, every batch padded to one size (10 patches: batches of 4, 4 and 2 padded to 4)
    compiled = efcm.teacher_features(teacher, patches[:10], name="t", batch_size=4, amp=True, device="cuda",
                                     cache=False, compile=True)
    assert_rows_aligned(compiled, cpu[:10], 0.99, "teacher features, torch.compile'd on CUDA (bf16)")


def _run_split(device: str, bags: list, teacher: torch.Tensor, bag_batch: int, amp: bool) -> efcm.FoldResult:
    # one epoch per stage: with more, a near-tie of validation losses could pick another best epoch per device
    cfg = efcm.Config(head_hidden=(16, 8), head_epochs=1, head_lr=1e-3, distill_epochs=1, distill_batch=32,
                      etc_epochs=1, student_out_index=1, k_sample=2, dropout=0.0, device=device,
                      amp=amp,  # no dropout: CUDA draws other masks than the CPU
                      etc_max_patches=3, bag_batch=bag_batch)  # bags of 4-6: ETC sub-samples every bag
    index = efcm.fold_index([b[1] for b in bags], k=5, seed=0)[0]
    return efcm.run_split(bags, efcm.split_features(teacher, bags), index, cfg, seed=0)


@pytest.mark.parametrize("bag_batch", [1, 4])  # CLAM's one bag a step, and the gpu profile's padded batches
def test_every_row_of_table_1_alike_on_cuda(monkeypatch, bag_batch):
    bags = _bags(24, "train") + _bags(24, "val")
    patches = torch.cat([b[0] for b in bags])
    teacher = patches.flatten(2).std(dim=2).repeat(1, 2)  # a cheap fixed teacher: (N, 6) texture contrast
    seen = []
    predict_bags = efcm.predict_bags
    monkeypatch.setattr(efcm, "predict_bags", lambda *a: seen.append(predict_bags(*a)) or seen[-1])
    cpu = _run_split("cpu", bags, teacher, bag_batch, amp=False)
    cpu_seen = list(seen)
    test_labels = torch.tensor([int(bags[i][1]) for i in cpu.test_index])
    # fp32 on CUDA gives the CPU's numbers; bf16 autocast, as the gpu profile trains, the same labels and shapes
    for amp in (False, True):
        seen.clear()
        with nullcontext() if amp else full_fp32():
            gpu = _run_split("cuda", bags, teacher, bag_batch, amp=amp)
        assert np.array_equal(gpu.test_index, cpu.test_index)
        assert {t: set(rows) for t, rows in gpu.probs.items()} == {t: set(rows) for t, rows in cpu.probs.items()}
        check = (lambda a, e, what: assert_same_scale(a, e, f"{what} (bf16)")) if amp else (
            lambda a, e, what: assert_close(a, e, 0.02, what))
        check(list(gpu.distill_loss.values()), list(cpu.distill_loss.values()), "stage-1 losses")
        assert len(seen) == len(cpu_seen) > 0
        for i, ((probs, labels, scores), (cpu_probs, cpu_labels, cpu_scores)) in enumerate(
                zip(seen, cpu_seen, strict=True)):
            assert_same(torch.as_tensor(labels), test_labels, f"bag labels of evaluation {i}")
            assert_same(torch.as_tensor(cpu_labels), test_labels, f"CPU bag labels of evaluation {i}")
            assert probs.dtype == cpu_probs.dtype and [s.shape for s in scores] == [s.shape for s in cpu_scores]
            check(probs, cpu_probs, f"bag probabilities of evaluation {i}")
            check(np.concatenate(scores), np.concatenate(cpu_scores), f"instance scores of evaluation {i}")


def test_predict_bags_returns_the_bag_labels_on_cuda():
    seed_rngs(0)
    head = build_model("clam_sb", in_dim=6, n_classes=2, hidden=(16, 8), k_sample=2)
    bags = [(b[0].flatten(2).std(dim=2).repeat(1, 2), b[1], b[2]) for b in _bags(16, "test")]
    cpu_probs, cpu_labels, _ = efcm.predict_bags(head, bags, "cpu")
    probs, labels, scores = efcm.predict_bags(head, bags, "cuda")
    assert_same(torch.as_tensor(labels), torch.tensor([int(b[1]) for b in bags]), "bag labels")
    assert_same(torch.as_tensor(labels), torch.as_tensor(cpu_labels), "bag labels against the CPU's")
    assert probs.dtype == cpu_probs.dtype and [len(s) for s in scores] == [len(b[0]) for b in bags]
    assert_close(probs, cpu_probs, 1e-3, "bag probabilities (fp32 on both)")
