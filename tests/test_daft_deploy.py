"""DAFT deployment: numpy preprocessing equal to torch's, OpenVINO export with parity, lazy loading and the compiled-model
cache, the per-case command (no torch import on its OpenVINO path, bad cases skipped) and the fresh-process timer."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from mdbench.data import boxprompt as preprocess
from mdbench.data.boxprompt import read_boxprompt_case as load_case
from mdbench.data.synthetic import write_synthetic_boxprompt_cases
from mdbench.efficiency import BACKENDS, ParityError
from mdbench.models import build_model, litemedsam
from mdbench.models.efficientvit_sam import build_efficientvit_sam
from mdbench.papers.daft.deploy import export
from mdbench.papers.daft.deploy.export import export_openvino, save_deployment
from mdbench.papers.daft.deploy.runtime import ExpertPool, read_manifest
from mdbench.papers.daft.deploy.timing import Stage, table_b_stages, time_cases
from mdbench.papers.daft.inference import segment_case

SMALL = dict(backbone="efficientvit_b0", depths=None, neck_width=32, neck_depth=1, neck_block="mbconv")


def _small_student():
    """The small student with BatchNorm statistics set on noise images, as training would set them on data.

    With the default statistics (mean 0, variance 1) the random backbone's activations shrink to ~1e-3 and its ReLU
    linear attention divides near-zero sums: its FP32 output is then defined only to ~2e-4 of its scale (PyTorch
    FP32 vs FP64), so any export's parity would hinge on the CPU's summation order.
    """
    torch.manual_seed(0)
    model = build_efficientvit_sam(build_model("litemedsam"), **SMALL)
    update_bn([torch.rand(4, 3, 256, 256)], model.image_encoder)
    return model.eval()


@pytest.mark.parametrize("shape", [(300, 200, 3), (100, 60, 3), (256, 256, 3), (37, 50), (600, 900, 3)])
def test_numpy_preprocessing_equals_the_torch_one(shape):
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ours, theirs = preprocess.preprocess_image(image), litemedsam.preprocess_image(image).numpy()
    assert ours.shape == theirs.shape == (1, 3, 256, 256)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("hw", [(300, 200), (60, 100), (256, 256), (700, 500)])
def test_numpy_postprocessing_and_boxes_equal_the_torch_ones(hw):
    logits = np.random.default_rng(1).standard_normal((2, 1, 256, 256)).astype(np.float32)
    ours = preprocess.postprocess_logits(logits, hw)
    theirs = litemedsam.postprocess_logits(torch.from_numpy(logits), hw)[:, 0].numpy()
    assert ours.shape == (2, *hw) and np.abs(ours - theirs).max() < 1e-3
    boxes = np.array([[3.7, 10.2, 150.9, 180.0]])
    assert (preprocess.scale_boxes(boxes, hw) == litemedsam.scale_boxes(boxes, hw)).all()


def test_area_resize_of_a_constant_block_by_hand():
    # 4 -> 2 by area averages pairs; 2 -> 4 bilinear with half-pixel centres: [a, .75a+.25b, .25a+.75b, b]
    x = np.array([[1.0, 3.0, 5.0, 7.0]], dtype=np.float32).T[:, :, None]  # (4, 1, 1)
    assert preprocess.resize(x, (2, 1), "area")[:, 0, 0].tolist() == [2.0, 6.0]
    y = np.array([[0.0], [4.0]], dtype=np.float32)[:, :, None]
    assert preprocess.resize(y, (4, 1), "bilinear")[:, 0, 0].tolist() == [0.0, 1.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A small expert exported once for the module (and copied as a second expert, "3D", to test routing and lazy
    loading without a second export), plus a 2D and a 3D case and a broken one."""
    root = tmp_path_factory.mktemp("deploy")
    model = _small_student()
    cases = write_synthetic_boxprompt_cases(root / "cases", 1, split="test", kinds=("2DBox_US", "3DBox_MR"),
                                            image_size=(96, 128), volume_shape=(8, 48, 48))
    manifest = save_deployment(root / "models", {"general": model}, example_image=load_case(cases[0])["imgs"])
    shutil.copytree(root / "models" / "openvino" / "general", root / "models" / "openvino" / "3D")
    manifest = {**manifest, "experts": ["general", "3D"], "parity": {**manifest["parity"], "3D": manifest["parity"]["general"]}}
    (root / "models" / "manifest.json").write_text(json.dumps(manifest))
    experts = {"general": model, "3D": model}
    broken = root / "cases" / "2DBox_US_broken.npz"
    np.savez_compressed(broken, imgs=np.zeros((8, 8, 3), np.uint8))  # no boxes
    return {"root": root, "experts": experts, "cases": cases, "broken": broken, "manifest": manifest}


def test_export_passes_parity_and_writes_ir(deployment):
    manifest = read_manifest(deployment["root"] / "models")
    assert manifest["experts"] == ["general", "3D"] and manifest["student"]["backbone"] == "efficientvit_b0"
    for expert in manifest["experts"]:
        for part in ("encoder", "decoder"):
            assert (deployment["root"] / "models" / "openvino" / expert / f"{part}.xml").is_file()
        for part in ("encoder", "decoder", "masks"):
            for backend in BACKENDS:
                report = manifest["parity"][expert][part][backend]
                assert report["passed"] and report["max_rel_diff"] <= 1e-3  # of the output's scale
        assert all(manifest["parity"][expert]["masks"][backend]["dice"] >= 0.99 for backend in BACKENDS)


@pytest.fixture(scope="module")
def teacher_disc():
    """The pretrained LiteMedSAM, a 256x256 image of a bright disc, and the disc's box: masks worth comparing (the
    random student's masks are empty)."""
    rows, cols = np.mgrid[:256, :256]
    disc = (rows - 128) ** 2 + (cols - 120) ** 2 <= 48**2
    return build_model("litemedsam"), np.where(disc, 200, 30).astype(np.uint8), (64.0, 72.0, 176.0, 184.0), disc


def test_deployed_masks_agree_with_pytorch_masks(teacher_disc, tmp_path):
    teacher, image, box, disc = teacher_disc
    torch_mask = teacher.predict_box(image, np.array(box))
    assert 2 * (torch_mask & disc).sum() / (torch_mask.sum() + disc.sum()) > 0.9  # a real mask, not an empty one
    masks = export_openvino(teacher, tmp_path, image, box=box)["masks"]  # the image is 256x256: box in its pixels
    for backend in BACKENDS:
        assert masks[backend].passed and masks[backend].input_shapes == [[image.shape, (1, 4)]]
        assert masks[backend].agreement >= 0.999 and masks[backend].dice >= 0.99
        assert masks[backend].max_rel_diff <= 1e-3  # the masks' logits, relative to their scale


def test_export_of_a_perturbed_copy_fails_parity(tmp_path, monkeypatch):
    """A 1% error in one weight of each half, made in the copy that is exported, is caught in both halves."""
    perturbed = {"backbone.stem.in_conv.conv.weight", "model.mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"}
    export_onnx = export.export_onnx

    def export_perturbed_copy(module, inputs, path, **kwargs):
        module = copy.deepcopy(module)
        with torch.no_grad():
            for name, weight in module.named_parameters():
                if name in perturbed:
                    weight.mul_(1.01)
        return export_onnx(module, inputs, path, **kwargs)

    monkeypatch.setattr(export, "export_onnx", export_perturbed_copy)
    with pytest.raises(ParityError) as error:
        export_openvino(_small_student(), tmp_path)
    for backend in BACKENDS:
        assert f"{backend} export of the encoder" in str(error.value)
        assert f"{backend} export of the decoder" in str(error.value)


def test_pool_loads_lazily_and_matches_pytorch(deployment, tmp_path):
    pool = ExpertPool(deployment["root"] / "models", lazy=True, cache_dir=tmp_path / "cache")
    assert pool.loaded == []
    case = load_case(deployment["cases"][1])  # the 3D case
    labels = segment_case(pool.get("3D"), case)
    assert pool.loaded == ["3D"]  # only the expert the case needs
    assert any((tmp_path / "cache").iterdir())  # compiled blobs written for later processes
    expected = segment_case(deployment["experts"]["3D"], case)
    assert labels.dtype == np.uint16 and labels.shape == case["imgs"].shape
    assert (labels == expected).mean() > 0.999
    assert ExpertPool(deployment["root"] / "models", lazy=False).loaded == ["general", "3D"]
    with pytest.raises(KeyError, match="experts"):
        pool.get("CT")


def test_predict_command_routes_skips_bad_cases_and_never_imports_torch(deployment, tmp_path):
    out = tmp_path / "out"
    cases = [deployment["broken"], *deployment["cases"]]
    # run the command as `python -m` would, and report afterwards whether torch was imported along the way
    check = ("import runpy, sys\n"
             "try:\n    runpy.run_module('mdbench.papers.daft.deploy.predict', run_name='__main__')\n"
             "except SystemExit:\n    print('torch imported:', 'torch' in sys.modules)\n    raise\n")
    done = subprocess.run([sys.executable, "-c", check, "--models", str(deployment["root"] / "models"),
                           "--out", str(out), "--embedding-cache", "--lazy", *map(str, cases)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # one case failed, the others went on
    assert "FAILED 2DBox_US_broken.npz: 2DBox_US_broken.npz: missing key(s) ['boxes']" in done.stderr
    assert "torch imported: False" in done.stdout
    assert "2DBox_US_synth_test_0000.npz\tgeneral" in done.stdout and "3DBox_MR_synth_test_0000.npz\t3D" in done.stdout
    segs = np.load(out / deployment["cases"][1].name)["segs"]
    assert segs.dtype == np.uint16 and segs.shape == (8, 48, 48)


def test_fresh_process_timer_runs_each_case_in_its_own_process(deployment, tmp_path):
    stage = table_b_stages()[-1]
    assert stage.compile_cache and "--lazy" in stage.options
    frame = time_cases(deployment["cases"][:1], stage, deployment["root"] / "models", tmp_path, threads=1)
    assert frame.returncode.tolist() == [0] and frame.seconds.iloc[0] > 0
    assert (tmp_path / "compile_cache__lazy_load" / "out" / deployment["cases"][0].name).is_file()
    bad = time_cases([deployment["broken"]], Stage("bad", ("--backend", "openvino")), deployment["root"] / "models",
                     tmp_path, threads=1)
    assert bad.returncode.tolist() == [2] and "missing key" in bad.error.iloc[0]


def test_predict_arguments_are_checked():
    from mdbench.papers.daft.deploy.predict import parse_args

    with pytest.raises(SystemExit):
        parse_args(["x.npz", "--out", "o", "--baseline"])  # the baseline is PyTorch only
    with pytest.raises(SystemExit):
        parse_args(["x.npz", "--out", "o"])  # experts need --models
    assert parse_args(["x.npz", "--out", "o", "--backend", "torch", "--baseline"]).baseline


def test_benchmark_script_prints_seconds_and_speed_up(deployment, monkeypatch, capsys):
    from mdbench.papers.daft.deploy import timing

    stages = [Stage("ov", ("--backend", "openvino")), Stage("ov lazy", ("--backend", "openvino", "--lazy"))]
    monkeypatch.setattr(timing, "table_b_stages", lambda: stages)
    assert timing.main([str(deployment["cases"][0]), "--models", str(deployment["root"] / "models"),
                        "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "seconds per case" in out and "speed-up" in out and deployment["cases"][0].name in out
