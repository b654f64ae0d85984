"""EFCM: TransScan, the students, the FPD loss, cached teacher features, distillation and the stage-2 strategies."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdbench import notebook, verdicts
from mdbench.data.synthetic import SyntheticMILBags
from mdbench.efficiency import count_flops, export_with_parity
from mdbench.losses.projection import FPDLoss, fpd_loss
from mdbench.models.clam import clam_sb
from mdbench.models.transscan import TransScan, TransScanStudent, build_transscan_student
from mdbench.papers.efcm import costs as efcm_costs
from mdbench.papers.efcm import experiment as efcm
from mdbench.results import load_reference

warnings.filterwarnings("ignore", message="no local pretrained weights")


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------- FPD loss
@pytest.mark.parametrize("projected, teacher, expected", [
    ([[1.0, 0.0]], [[0.0, 1.0]], 1.0 + 1.0),  # MSE (1 + 1) / 2 = 1, orthogonal: 1 - cos = 1
    ([[2.0, 0.0]], [[1.0, 0.0]], 0.5 + 0.0),  # MSE (1 + 0) / 2, parallel: 1 - cos = 0
    ([[1.0, 1.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 2.0]], 0.25 + (1 - 2 ** -0.5) / 2),  # batch means
])
def test_fpd_loss_by_hand(projected, teacher, expected):
    assert fpd_loss(torch.tensor(projected), torch.tensor(teacher)).item() == pytest.approx(expected, abs=1e-6)


def test_fpd_loss_gradient_reaches_only_the_student_and_mse_only_is_plain_kd():
    projected = torch.tensor([[1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0]], requires_grad=True)
    FPDLoss()(projected, teacher).backward()
    assert teacher.grad is None and projected.grad.abs().sum() > 0
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    assert fpd_loss(x, y, cos_weight=0.0).item() == pytest.approx(F.mse_loss(x, y).item())
    with pytest.raises(ValueError, match="one shape"):
        fpd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not both zero"):
        fpd_loss(x, y, mse_weight=0.0, cos_weight=0.0)


# -------------------------------------------------------------------------------------------------- TransScan
def test_transscan_keeps_shape_mixes_branches_per_channel_and_trains_every_part():
    torch.manual_seed(0)
    block = TransScan(16, num_heads=4)
    weights = {}
    block.scan.attn.register_forward_hook(lambda m, i, o: weights.setdefault("a", o))
    x = torch.randn(2, 16, 4, 4)
    y = block(x)
    assert y.shape == x.shape
    # SK: softmax over the 3 branches (receptive fields 3, 5, 7), one weight per channel: (B, K, C, 1, 1)
    assert weights["a"].shape == (2, 3, 16, 1, 1)
    assert torch.allclose(weights["a"].sum(dim=1), torch.ones(2, 16, 1, 1))
    assert [p.dilation for p in (path.conv for path in block.scan.paths)] == [(1, 1), (2, 2), (3, 3)]
    assert all(path.conv.groups == 16 for path in block.scan.paths)  # depthwise
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), "a part gets no gradient"
    with pytest.raises(ValueError, match="divisible"):
        TransScan(10, num_heads=4)


# --------------------------------------------------------------------------------------------------- students
def test_student_variants_shapes_and_parameter_counts():
    fpd_ts, fpd, kd = (build_transscan_student(v, 256, out_index=1) for v in ("fpd_ts", "fpd", "kd"))
    c = fpd.feature_dim  # resnet10t stage 1: 64 channels at stride 4
    assert c == 64
    x = torch.rand(3, 3, 16, 16)
    for student in (fpd_ts, fpd, kd):
        assert student(x).shape == (3, 256) and student.embed(x).shape == (3, c)
    mlp = c * 512 + 512 + 512 * 256 + 256
    assert _n(fpd.projector) == mlp and _n(kd.projector) == c * 256 + 256
    assert _n(fpd_ts) - _n(fpd) == _n(fpd_ts.transscan)
    assert _n(fpd) - _n(kd) == mlp - (c * 256 + 256)
    bare = TransScanStudent(256, out_index=1, transscan=False, projector=None)
    assert bare(x).shape == (3, c) and bare.out_dim == c
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        fpd(torch.rand(3, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown student variant"):
        build_transscan_student("fitnet", 256)


def test_student_exports_to_onnx_runtime_with_parity(tmp_path):
    student = build_transscan_student("fpd_ts", 32, out_index=1).eval()
    _, report = export_with_parity(student, (torch.rand(2, 3, 16, 16),), backend="onnxruntime", workdir=tmp_path)
    assert report.passed and report.max_rel_diff < 1e-4  # of the features' scale


# ------------------------------------------------------------------------------------------ teacher features
class _CountingEncoder(nn.Module):
    """Stand-in teacher: channel means at a fixed input size; counts its calls."""

    input_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.shapes = 0, []

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_teacher_features_are_resized_batched_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(efcm.CACHE_ENV, str(tmp_path))
    encoder, patches = _CountingEncoder(), torch.rand(5, 3, 4, 4)
    teacher = efcm.PatchEncoder(encoder)
    first = efcm.teacher_features(teacher, patches, name="toy", batch_size=2, amp=False)
    assert encoder.calls == 3 and encoder.shapes[0] == (2, 3, 8, 8)  # upsampled to the encoder's input size
    assert torch.allclose(first, patches.mean(dim=(2, 3)), atol=1e-6)  # bilinear resizing keeps the mean here
    again = efcm.teacher_features(teacher, patches, name="toy", batch_size=2, amp=False)
    assert encoder.calls == 3 and torch.equal(first, again)  # read from the cache, not recomputed
    repeated = torch.cat([patches, patches[:2]]) + 0.01
    features = efcm.teacher_features(teacher, repeated, name="toy", batch_size=8, amp=False)
    assert encoder.calls == 4 and encoder.shapes[-1][0] == 5  # other patches, other cache entry; repeats once
    assert torch.allclose(features, repeated.mean(dim=(2, 3)), atol=1e-6)
    assert len(list((tmp_path / "efcm").glob("toy-*.pt"))) == 2
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        efcm.teacher_features(teacher, torch.rand(5, 4, 4), name="toy")


def test_litemedsam_teacher_gives_256_d_pooled_features_of_a_small_tile(tmp_path, monkeypatch):
    from mdbench.models import build_model

    monkeypatch.setenv(efcm.CACHE_ENV, str(tmp_path))
    teacher = efcm.PatchEncoder(build_model("litemedsam_encoder"))
    features = efcm.teacher_features(teacher, torch.rand(1, 3, 32, 32), name="tile", amp=True)
    assert features.shape == (1, 256) and torch.isfinite(features).all()


# ----------------------------------------------------------------------------------------------- the stages
def _image_bags(n: int, seed: int = 0, split: str = "train"):
    data = SyntheticMILBags(n, bag_size=(4, 6), instances="images", image_size=16, seed=seed, split=split)
    return [data[i] for i in range(n)]


def test_distillation_lowers_the_fpd_loss_without_labels():
    torch.manual_seed(0)
    patches = torch.cat([b[0] for b in _image_bags(8)])
    targets = patches.mean(dim=(2, 3)).repeat(1, 4) * 3  # any fixed teacher map of the patches: (N, 12)
    student = build_transscan_student("fpd_ts", 12, out_index=1)
    before = fpd_loss(student.eval()(patches), targets).item()
    history = efcm.distill(student, patches, targets, epochs=8, lr=3e-3, batch_size=16)
    after = fpd_loss(student.eval()(patches), targets).item()
    assert after < 0.5 * before, (before, after, history.to_frame().train_loss.tolist())


def test_end_to_end_mil_subsamples_gradients_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    student = build_transscan_student("fpd", 8, out_index=1)
    model = efcm.EndToEndMIL(student, clam_sb(8, hidden=(8, 4)), max_patches=2)
    running = [m.running_mean.clone() for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    patches = torch.rand(5, 3, 16, 16)  # one bag
    out = model.train()(patches, 1)
    assert out.logits.shape == (1, 2) and out.attention.shape == (1, 5)
    out.logits.sum().backward()
    assert student.projector[0].weight.grad.abs().sum() > 0
    after = [m.running_mean for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after, strict=True)), "frozen BatchNorm statistics changed"
    assert model.eval()(patches).attention.shape == (1, 5)
    assert model(patches[None]).attention.shape == (1, 1, 5)  # a batch of one bag


def test_run_split_gives_every_row_of_table_1():
    bags = _image_bags(12) + _image_bags(12, split="val")
    patches = torch.cat([b[0] for b in bags])
    teacher = patches.flatten(2).std(dim=2).repeat(1, 2)  # a cheap fixed teacher: (N, 6) texture contrast
    cfg = efcm.Config(head_hidden=(16, 8), head_epochs=2, head_lr=1e-3, distill_epochs=1, distill_batch=32,
                      etc_epochs=1, student_out_index=1, k_sample=2)
    index = efcm.fold_index([b[1] for b in bags], k=4, seed=0)[1]
    result = efcm.run_split(bags, efcm.split_features(teacher, bags), index, cfg, seed=0)
    expected = {"teacher_clam", "no_distill_etc", "kd_retrain"} | {
        f"{v}_{s}" for v in ("fpd", "fpd_ts") for s in ("reuse", "retrain", "etc")}
    assert set(result.probs["table1"]) == expected
    assert set(result.probs["mil_heads"]) == {"clam_sb", "clam_mb", "abmil", "mil"}
    n_test = len(index["test"])
    for probs in (*result.probs["table1"].values(), *result.probs["mil_heads"].values()):
        assert probs.shape == (n_test, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert result.test_index.tolist() == index["test"].tolist()
    assert [len(s) for s in result.instance_scores["fpd_ts_etc"]] == [len(bags[i][0]) for i in index["test"]]
    assert np.array_equal(result.probs["table1"]["teacher_clam"], result.probs["mil_heads"]["clam_sb"])
    assert set(result.distill_loss) == {"kd", "fpd", "fpd_ts"}


def test_mosaic_reassembles_an_image_cut_into_tiles():
    from mdbench.data.mil import tile_image

    image = torch.rand(3, 8, 12)
    tiles = tile_image(image, 4)  # 2 x 3 tiles, row-major
    picture, grid = efcm.mosaic(tiles, range(6), cols=3)
    assert torch.allclose(torch.from_numpy(picture).float().permute(2, 0, 1), image)
    assert grid.tolist() == [[0, 1, 2], [3, 4, 5]]
    _, grid = efcm.mosaic(tiles[:5], range(5))  # default ceil(sqrt(5)) = 3 columns, the empty cell is NaN
    assert grid.shape == (2, 3) and np.isnan(grid[1, 2])
    with pytest.raises(ValueError, match="4 values for 5"):
        efcm.mosaic(tiles[:5], range(4))


def test_costs_add_up_per_patch_and_per_bag():
    encoder = efcm.PatchEncoder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8)))
    head = clam_sb(8, hidden=(4, 2))
    rows = efcm_costs.measure_costs({"toy": encoder}, head, input_size=4, bag_size=10, repeats=2)["toy"]
    head_flops = count_flops(head, (torch.randn(10, 8),)).flops
    assert rows["gflops_patch"] == pytest.approx(2 * 48 * 8 / 1e9)  # one 48 -> 8 matmul: 2 x MACs
    assert rows["gflops_bag"] == pytest.approx(10 * rows["gflops_patch"] + head_flops / 1e9)
    assert rows["params_m"] == pytest.approx((48 * 8 + 8 + sum(p.numel() for p in head.parameters())) / 1e6)
    assert rows["s_bag"].shape == rows["ms_patch"].shape == (2,)  # one per timed round
    assert (rows["s_bag"] > 10 * rows["ms_patch"] / 1e3).all() and (rows["ms_patch"] > 0).all()
    rates = efcm_costs.throughput(encoder, 4, batch_size=16, repeats=2)
    assert rates.shape == (2,) and (rates > 0).all()


def test_table2_times_are_medians_of_repeats_kept_one_line_each_and_paired_in_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(tmp_path))
    head = clam_sb(8, hidden=(4, 2))
    encoders = {"teacher": efcm.PatchEncoder(nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.Linear(64, 8))),
                "student_fpd_ts": efcm.PatchEncoder(nn.Sequential(nn.Flatten(), nn.Linear(48, 8)))}
    costs = efcm_costs.measure_costs(encoders, head, input_size=4, bag_size=10, repeats=3)
    frame, repeats = efcm_costs.record_costs(costs, efcm.Config(), input_size=4)
    assert set(repeats.metric) == {"ms_patch", "s_bag"}  # wall-clock metrics only, not the counts
    assert repeats.groupby(["row", "metric"]).unit.apply(list).map(tuple).unique().tolist() == [
        ("rep00", "rep01", "rep02")]  # the same repeat ids for every row: claims pair them
    value = frame.set_index(["row", "metric"]).value
    assert value["teacher", "s_bag"] == np.median(costs["teacher"]["s_bag"])

    session = notebook.start("efcm", {"profile": "smoke"})
    session.record_frame("table2", frame, samples=repeats, aggregate="median")
    records = {(r.row, r.metric): r for r in session.store.records()}
    assert records["teacher", "s_bag"].samples_ref.aggregate == "median"
    assert records["teacher", "gflops_bag"].samples is None
    claims = verdicts.evaluate_claims(load_reference("efcm"), session.store.records(), session.store.samples)
    row = claims.set_index("claim").loc["student_time_fraction"]
    assert row.test == "bootstrap of medians over 3 units" and row.n == 3
    assert row.difference == pytest.approx(np.median(costs["student_fpd_ts"]["s_bag"])
                                           - 0.1 * np.median(costs["teacher"]["s_bag"]))


def test_load_bags_on_real_data(real_data_dir):
    isic = efcm.load_bags("isic2017", n_bags=6, patch_size=16, isic_grid=2, data_dir=real_data_dir)
    assert len(isic.bags) == 6 and sum(b[1] for b in isic.bags) == 3
    assert all(i.startswith("ISIC_") for i in isic.ids)  # the images' own names
    assert isic.bags[0][0].shape == (4, 3, 16, 16) and isic.bags[0][2].shape == (4,)
    pbc = efcm.load_bags("pbc", n_bags=10, bag_size=(2, 3), patch_size=16, data_dir=real_data_dir)
    assert len(pbc.bags) == 10 and sum(b[1] for b in pbc.bags) == 5
    cells = [bytes(cell.numpy()) for b in pbc.bags for cell in b[0]]
    assert len(set(cells)) == len(cells)  # no cell in two sets: a k-fold split of the sets keeps cells apart
    assert all(int(b[2].max()) == b[1] for b in pbc.bags)  # positive iff it holds an erythroblast
    ucsb = efcm.load_bags("ucsb_breast", n_bags=0, data_dir=real_data_dir)
    assert ucsb.kind == "features" and len(ucsb.bags) == 58 and ucsb.bags[0][0].shape[1] == 708
    assert len(set(ucsb.ids)) == 58
    with pytest.raises(ValueError, match="unknown EFCM dataset"):
        efcm.load_bags("camelyon16", n_bags=4)
