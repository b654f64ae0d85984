"""CLAM-SB/MB, ABMIL and max-instance MIL heads, the smooth top-1 SVM and CLAM's pseudo-labels."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdbench.data.splits import split_indices
from mdbench.data.synthetic import SyntheticMILBags
from mdbench.data.ucsb_breast import UCSBBreastDataset
from mdbench.losses.mil import SmoothTop1SVM, smooth_top1_svm
from mdbench.metrics import classification_metrics
from mdbench.models import UnknownModelError, build_model
from mdbench.models.clam import CLAM, MaxMIL, abmil, clam_mb, clam_sb, mil_loss, pseudo_labels
from mdbench.papers.efcm.experiment import FeatureScaler, predict_bags, train_mil

from conftest import real_dataset


# ------------------------------------------------------------------------------------------- smooth top-1 SVM
@pytest.mark.parametrize("scores, target, alpha, tau, expected", [
    # augmented scores s_j + [j != y] - s_y = (0, 0): log(1 + 1)
    ([1.0, 0.0], 0, 1.0, 1.0, math.log(2)),
    # (2 + 1 - 0, 0) = (3, 0): log(e^3 + 1)
    ([2.0, 0.0], 1, 1.0, 1.0, math.log(math.exp(3) + 1)),
    # three classes, tau = 2: (0 + 1 - 2, 1 + 1 - 2, 0) = (-1, 0, 0): 2 log(e^-0.5 + 2)
    ([0.0, 1.0, 2.0], 2, 1.0, 2.0, 2 * math.log(math.exp(-0.5) + 2)),
    # alpha = 0: plain log-sum-exp minus the target score, log(e^0 + e^1) - 1
    ([0.0, 1.0], 1, 0.0, 1.0, math.log(1 + math.e) - 1),
    # top-1 leads top-2 by 8 >= log(1000): hard form max(0, 0 + 1 - 8) = 0 (smooth would be log(1 + e^-7))
    ([8.0, 0.0], 0, 1.0, 1.0, 0.0),
    # hard form on the wrong class: max(8 + 1 - 0, 0) = 9 (smooth would be log(e^9 + 1))
    ([8.0, 0.0], 1, 1.0, 1.0, 9.0),
])
def test_smooth_svm_matches_hand_computed_values(scores, target, alpha, tau, expected):
    loss = smooth_top1_svm(torch.tensor([scores]), torch.tensor([target]), alpha=alpha, tau=tau)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_smooth_svm_reductions_and_gradient():
    scores = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    per_sample = smooth_top1_svm(scores, targets, reduction="none")
    assert per_sample.tolist() == pytest.approx([math.log(2), math.log(math.exp(3) + 1)], abs=1e-6)
    assert smooth_top1_svm(scores, targets, reduction="sum").item() == pytest.approx(per_sample.sum().item())
    SmoothTop1SVM()(scores[:1], targets[:1]).backward()
    # d/ds of log(e^0 + e^(s1 + 1 - s0)) at s = (1, 0): the softmax of (0, 0) is (1/2, 1/2), so (-1/2, +1/2)
    assert scores.grad[0].tolist() == pytest.approx([-0.5, 0.5])
    assert scores.grad[1].tolist() == [0.0, 0.0]


def test_smooth_svm_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        smooth_top1_svm(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        smooth_top1_svm(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="tau > 0"):
        smooth_top1_svm(torch.zeros(1, 2), torch.tensor([0]), tau=0.0)


# ------------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_by_hand():
    attention = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])
    index, targets = pseudo_labels(attention, k=2, in_class=True)
    assert index.tolist() == [1, 3, 2, 0]  # top-2 (0.40, 0.30), then bottom-2 (0.05, 0.10)
    assert targets.tolist() == [1, 1, 0, 0]
    index, targets = pseudo_labels(attention, k=2, in_class=False)
    assert index.tolist() == [1, 3] and targets.tolist() == [0, 0]
    with pytest.raises(ValueError, match="k=3"):
        pseudo_labels(attention, k=3, in_class=True)


def _instance_loss_by_hand(model: CLAM, x: torch.Tensor, label: int) -> torch.Tensor:
    """CLAM's instance loss recomputed from the model's parts (eval mode: no dropout)."""
    h = model.fc(x)
    attention = model.attention(h).T.softmax(dim=1)
    k = min(model.k_sample, len(x) // 2)
    total = torch.zeros(())
    for c, classifier in enumerate(model.instance_classifiers):
        if c != label and not model.subtyping:
            continue
        index, targets = pseudo_labels(attention[c if model.multi_branch else 0], k, c == label)
        total = total + smooth_top1_svm(classifier(h[index]), targets)
    return total / model.n_classes if model.subtyping else total


@pytest.mark.parametrize("multi_branch, subtyping, n_classes", [(False, False, 2), (True, False, 2), (True, True, 3),
                                                                (False, True, 3)])
def test_clam_instance_loss_and_gradients(multi_branch, subtyping, n_classes):
    torch.manual_seed(0)
    model = CLAM(in_dim=12, n_classes=n_classes, hidden=(16, 8), multi_branch=multi_branch, k_sample=3,
                 subtyping=subtyping).eval()
    x = torch.randn(10, 12)
    out = model(x, label=1)
    assert out.logits.shape == (1, n_classes)
    assert out.attention.shape == (n_classes if multi_branch else 1, 10)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(out.attention.shape[0]))
    assert out.instance_scores.shape == (10,)
    assert out.instance_loss.item() == pytest.approx(_instance_loss_by_hand(model, x, 1).item(), abs=1e-6)
    total = mil_loss(out, 1, bag_weight=0.7)
    bag = F.cross_entropy(out.logits, torch.tensor([1]))
    assert total.item() == pytest.approx(0.7 * bag.item() + 0.3 * out.instance_loss.item(), abs=1e-6)
    total.backward()
    # without subtyping only the bag's own class's instance classifier is trained
    for c, classifier in enumerate(model.instance_classifiers):
        trained = classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0
        assert trained == (c == 1 or subtyping), f"instance classifier {c}"


def test_batched_instance_loss_under_bf16_autocast_is_fp32_and_near_the_fp32_one():
    # The gpu profile trains EFCM's heads under autocast; the batched instance loss once summed fp32 branch losses
    # into a bf16 buffer and failed (found by tests/gpu on an H200, reproduced here on the CPU).
    torch.manual_seed(0)
    model = clam_sb(in_dim=6, hidden=(16, 8), k_sample=2).eval()
    h = torch.randn(2, 6, 6)
    full = model(h, label=[0, 1], lengths=[6, 5]).instance_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(h, label=[0, 1], lengths=[6, 5]).instance_loss
    assert mixed.dtype == torch.float32 and mixed.shape == (2,)
    assert torch.allclose(mixed, full, rtol=0.05), (mixed, full)


def test_small_bags_use_half_the_bag_and_single_instances_skip_clustering():
    model = clam_sb(in_dim=4, hidden=(8, 4), k_sample=8).eval()
    x = torch.randn(5, 4)
    assert model(x, label=0).instance_loss.item() == pytest.approx(_instance_loss_by_hand(model, x, 0).item())
    assert model(x[:1], label=1).instance_loss.item() == 0.0


def test_abmil_has_no_instance_loss_and_mb_has_one_classifier_per_class():
    model = abmil(in_dim=6, n_classes=2, hidden=(8, 4))
    out = model(torch.randn(7, 6), label=1)
    assert out.instance_loss is None and len(model.instance_classifiers) == 0
    assert mil_loss(out, 1).item() == pytest.approx(F.cross_entropy(out.logits, torch.tensor([1])).item())
    mb = clam_mb(in_dim=6, n_classes=3, hidden=(8, 4))
    assert len(mb.classifiers) == 3 and mb.classifiers[0].out_features == 1
    assert mb(torch.randn(1, 7, 6)).logits.shape == (1, 3)  # a (1, N, D) batch of one bag works too


def _identity_max_mil(dim: int, n_classes: int) -> MaxMIL:
    model = MaxMIL(in_dim=dim, n_classes=n_classes, hidden=dim, dropout=0.0)
    with torch.no_grad():
        for layer in (model.fc[0], model.classifier):
            layer.weight.copy_(torch.eye(dim))
            layer.bias.zero_()
    return model


def test_max_mil_takes_the_top_instance():
    binary = _identity_max_mil(2, 2)  # logits = relu(x)
    out = binary(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]))
    assert out.logits.tolist() == [[0.0, 2.0]]  # instance 1 has the highest p(class 1)
    assert out.attention is None and out.instance_loss is None
    multi = _identity_max_mil(3, 3)
    # largest probability over all instances and classes: e^3 / (e^3 + 2) of instance 0, class 0
    out = multi(torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    assert out.logits.tolist() == [[3.0, 0.0, 0.0]]


def test_heads_refuse_bad_input():
    model = build_model("clam_sb", in_dim=8)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="outside"):
        model(torch.randn(5, 8), label=2)
    with pytest.raises(UnknownModelError, match="clam_sb"):  # the message lists the known heads
        build_model("transmil", in_dim=8)
    with pytest.raises(ValueError, match="bag_weight"):
        mil_loss(model(torch.randn(3, 8)), 0, bag_weight=1.5)


def test_parameter_count_of_clam_sb_small():
    """CLAM-SB "small" on 1024-d features, counted layer by layer from CLAM's model_clam.py."""
    model = clam_sb(in_dim=1024, n_classes=2, hidden=(512, 256))
    fc = 1024 * 512 + 512
    attention = 2 * (512 * 256 + 256) + (256 * 1 + 1)
    classifier = 512 * 2 + 2
    instance = 2 * (512 * 2 + 2)
    assert sum(p.numel() for p in model.parameters()) == fc + attention + classifier + instance


# ------------------------------------------------------------------------------------- trained heads
def _auc(head, bags) -> float:
    """Bag AUC (%) of a trained head."""
    probs, labels, _ = predict_bags(head, bags)
    return 100 * classification_metrics(labels, probs)["auc"]


def test_clam_beats_chance_on_synthetic_feature_bags():
    def bags(n, split):
        data = SyntheticMILBags(n, bag_size=(8, 16), feature_dim=8, seed=1, split=split)
        return [data[i] for i in range(n)]

    torch.manual_seed(0)
    head = clam_sb(8, hidden=(32, 16), dropout=0.0, k_sample=2)
    test = bags(40, "test")
    untrained = _auc(head, test)
    train_mil(head, bags(120, "train"), None, epochs=6, lr=1e-3)
    trained = _auc(head, test)
    assert trained > 75 and trained > untrained + 15, (untrained, trained)


def test_clam_beats_chance_on_real_ucsb_breast_bags(real_data_dir):
    data = UCSBBreastDataset(real_dataset(real_data_dir, "ucsb_breast"), split="all")
    bags = [(x, y, None) for x, y in data]
    index = split_indices(len(bags), [b[1] for b in bags], fractions=(0.7, 0.0, 0.3), seed=0)
    parts = {name: [bags[i] for i in part] for name, part in index.items()}
    scaler = FeatureScaler.fit(parts["train"])
    torch.manual_seed(0)
    head = clam_sb(708, hidden=(128, 64))
    train_mil(head, scaler(parts["train"]), None, epochs=10, lr=2e-4)
    assert _auc(head, scaler(parts["test"])) > 70
