"""One figure style (mdbench/figures.py): SVG plus a 300-dpi PNG, human names, no overlapping labels, ×N bars,
no log axis over a narrow range."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from mdbench import figures  # noqa: E402
from mdbench.paper_yaml import PaperFileError, known_papers  # noqa: E402
from mdbench.results import ResultStore, load_records, results_root  # noqa: E402


def test_save_writes_an_svg_and_a_300_dpi_png(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    paths = figures.save(fig, tmp_path / "sub" / "curve")
    assert [p.name for p in paths] == ["curve.svg", "curve.png"]
    assert paths[0].read_text().lstrip().startswith("<?xml") and "<svg" in paths[0].read_text()
    with Image.open(paths[1]) as png:
        assert png.format == "PNG" and round(png.info["dpi"][0]) == figures.PNG_DPI
    first = paths[0].read_bytes()
    figures.save(fig, tmp_path / "sub" / "curve")
    assert paths[0].read_bytes() == first  # no date or random ids: a redraw rewrites the same file
    assert not list((tmp_path / "sub").glob(".tmp-*"))


def test_a_store_saves_figures_through_the_one_helper(tmp_path):
    fig, _ = plt.subplots(figsize=(1, 1))
    paths = ResultStore("quickstart", "smoke", root=tmp_path).save_figure(fig, "training")
    assert sorted(p.name for p in paths) == ["training.png", "training.svg"]


@pytest.mark.parametrize(("values", "scale"), [([4.7, 11.1], "linear"), ([1.0, 9.9], "linear"),
                                               ([0.1, 5.7, 75.0], "log"), ([0.0, 100.0], "linear"),
                                               ([-1.0, 100.0], "linear")])
def test_log_axes_only_over_a_decade_or_more(values, scale):
    _, ax = plt.subplots()
    assert figures.set_scale(ax, "x", values) == scale and ax.get_xscale() == scale
    with pytest.raises(ValueError, match="axis"):
        figures.set_scale(ax, "z", values)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_labels_of_nearby_points_end_up_apart_and_coincident_points_share_one():
    figures.apply_style()
    fig, ax = plt.subplots(figsize=(4, 3))
    xs, ys = [1.0, 1.0, 1.05, 1.1, 2.0, 1.0], [50.0, 50.0, 51.0, 52.0, 60.0, 51.5]
    ax.scatter(xs, ys)
    texts = figures.label_points(ax, xs, ys, [f"method number {k}" for k in range(6)])
    fig.canvas.draw()
    assert len(texts) == 5 and "method number 0\nmethod number 1" in [t.get_text() for t in texts]
    boxes = [t.get_window_extent() for t in texts]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    with pytest.raises(ValueError, match="labels"):
        figures.label_points(ax, xs, ys, ["one"])


def test_speed_up_bars_read_times_n():
    _, ax = plt.subplots()
    bars = ax.bar(["a", "b"], [10.0, 2.0])
    labels = figures.annotate_speedups(ax, bars, [1.0, 5.04])
    assert [t.get_text() for t in labels] == ["×1.0", "×5.0"]
    with pytest.raises(ValueError, match="speed-up"):
        figures.annotate_speedups(ax, bars, [1.0])


def test_human_names_compose_and_missing_ones_are_found():
    names = {"kd": "Hinton KD", "resnet18": "ResNet-18", "fpd_ts_etc": "FPD + TransScan + ETC"}
    assert figures.human(names, "fpd_ts_etc") == "FPD + TransScan + ETC"
    assert figures.human(names, "kd/resnet18") == "Hinton KD (ResNet-18)"
    assert figures.human(names, "rd/resnet18") == "rd/resnet18"
    assert figures.missing_names(names, ["kd/resnet18", "rd/resnet18", "kd", "x"]) == ["rd/resnet18", "x"]


def test_a_bad_names_section_is_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "paper.yaml").write_text("paper: p\nnames: {fpd: ''}\n")
    with pytest.raises(PaperFileError, match="non-empty human name"):
        figures.method_names("p", tmp_path)


@pytest.mark.parametrize("paper", [p for p in known_papers() if p != "quickstart"])
def test_every_committed_row_of_a_paper_has_a_human_name(paper):
    rows = {r.row for r in load_records(results_root() / paper / "cpu" / "records")}
    if not rows:
        pytest.skip(f"no committed cpu records of {paper}")
    assert figures.missing_names(figures.method_names(paper), rows) == []


def _texts(fig) -> str:
    """Every text of ``fig`` (titles, labels, tick labels, legends, annotations), joined."""
    fig.canvas.draw()
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def test_rd_leaves_out_fm_rows_that_ran_on_a_stand_in_and_names_methods():
    import numpy as np
    import pandas as pd

    from mdbench.papers.rd import experiment as rdx

    runs = pd.DataFrame([{"dataset": d, "method": m, "student": s, "accuracy": a + seed, "seed": seed,
                          "curve": np.array([[1, 2.0], [2, 1.5]])}
                         for d in ("pbc", "isic2017") for seed in (0, 1)
                         for m, s, a in (("fm_linear_probe", "—", 60.0), ("rd", "resnet18", 65.0),
                                         ("kd", "resnet18", 64.0))])
    costs = pd.DataFrame({"model": ["litemedsam", "litemedsam_stem", "resnet18"], "flops": [75e9, 11e9, 4.7e9],
                          "input_shape": ["1x3x256x256"] * 3})
    text = _texts(rdx.plot_accuracy(runs, costs, "litemedsam_stem"))
    assert "left out: FM linear probe" in text and "stand-in" in text
    assert "Reprogramming Distillation (ResNet-18)" in text and "rd/resnet18" not in text
    real = rdx.plot_accuracy(runs, costs, "litemedsam")  # the real FM: plotted at its own cost, on a log axis
    assert "left out" not in _texts(real) and real.axes[0].get_xscale() == "log"
    curves = rdx.plot_curves(runs, "resnet18")
    assert curves.axes[0].get_yscale() == "linear" and "Hinton KD" in _texts(curves)
    plt.close("all")


def test_med_tuning_and_daft_plots_show_human_names_and_speed_ups():
    import pandas as pd

    from mdbench.papers.daft import experiment as daft
    from mdbench.papers.med_tuning import experiment as mt

    summary = pd.DataFrame({"row": ["scratch_unet3d", "full", "med_tuning"], "dice_mean": [22.5, 22.2, 20.4],
                            "dice_mean_std": [1.0, 2.0, 1.5], "tuned_params_m": [1.19, 5.79, 0.91],
                            "train_memory_mb": [29.0, 1494.0, 722.0], "train_memory_mb_std": [1.0, 3.0, 2.0]})
    fig, (ax_params, ax_memory) = plt.subplots(1, 2)
    mt.plot_dice_vs_params(ax_params, summary)
    mt.plot_memory(ax_memory, summary, "peak RSS")
    text = _texts(fig)
    assert "3D U-Net (scratch)" in text and "Full fine-tuning" in text and "scratch_unet3d" not in text
    assert ax_params.get_xscale() == "linear"  # 0.9 to 5.8 M: under a decade

    per_case = pd.DataFrame([{"row": row, "modality": "US", "dsc": 80.0, "error": "", "seed": 0, "case": "c"}
                             for row in daft.ROWS])
    frame = pd.DataFrame({"stage": ["LiteMedSAM (PyTorch)", "+ OpenVINO"] * 2, "seconds": [30.0, 6.0, 90.0, 12.0],
                          "dims": [2, 2, 3, 3]})
    timings = daft.Timings(frame, frame.groupby("stage", sort=False).seconds.mean(), 2)  # 60 s, then 9 s
    text = _texts(daft.plot_scores(daft.TableA(per_case, {}), timings))
    assert "×1.0" in text and "×6.7" in text and "EfficientViT-SAM, KD only" in text
    plt.close("all")


def test_figures_are_redrawn_from_the_records_alone(tmp_path):
    import shutil

    source = results_root() / "rd" / "cpu" / "records"
    records = tmp_path / "rd" / "cpu" / "records"
    records.mkdir(parents=True)
    for path in [*source.glob("table1__*.json"), *source.glob("table2__*.json")]:
        shutil.copy(path, records / path.name)
    paths = figures.regenerate(["rd", "quickstart"], "cpu", tmp_path)  # the quickstart has no experiment module
    assert sorted(p.name for p in paths) == ["accuracy_vs_flops_and_seed_spread.png",
                                             "accuracy_vs_flops_and_seed_spread.svg"]
    svg = (tmp_path / "rd" / "cpu" / "accuracy_vs_flops_and_seed_spread.svg").read_text()
    assert "left out: FM full fine-tuning" in svg and "Reprogramming Distillation (ResNet-18)" in svg
    assert figures.regenerate(["med_tuning"], "cpu", tmp_path) == []  # no records, no figure


def test_a_styled_plot_draws_the_same_jitter_and_leaves_the_random_state_alone():
    import numpy as np

    @figures.styled
    def draw():
        return np.random.rand(3)

    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    assert (draw() == draw()).all()
    assert (np.random.get_state()[1] == before).all()


def _overlaps(fig) -> list[tuple[str, str]]:
    """The pairs of point labels (texts inside an axes) of ``fig`` whose boxes overlap."""
    fig.canvas.draw()
    found = []
    for ax in fig.axes:
        boxes = [(t.get_text(), t.get_window_extent()) for t in ax.texts if t.get_text()]
        found += [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if _overlap(box, other)]
    return found


def test_the_committed_records_make_figures_whose_labels_do_not_overlap():
    from mdbench import pareto
    from mdbench.papers.efcm import experiment as efcm

    efcm_figures = efcm.record_figures(ResultStore("efcm", "cpu", root=results_root()))
    assert _overlaps(efcm_figures["pareto"]) == []
    assert _overlaps(pareto.plot(pareto.build(profile="cpu"))) == []
    plt.close("all")


def test_daft_scores_and_speed_ups_are_redrawn_from_the_per_case_outputs():
    from mdbench.papers.daft import experiment as daft

    store = ResultStore("daft", "cpu", root=results_root())
    records = {(r.table, r.row, r.metric): r.mean for r in store.records()}
    text = _texts(daft.record_figures(store)["dsc_and_seconds"])
    fastest = records[("table_b", "+ compile cache, lazy load", "speedup")]
    assert "×1.0" in text and f"×{fastest:.1f}" in text and "EfficientViT-SAM, KD only" in text
    plt.close("all")


def test_med_tuning_curves_are_redrawn_from_the_curve_tables_its_notebook_saved(tmp_path):
    import shutil

    source = results_root() / "med_tuning" / "gpu"
    target = tmp_path / "med_tuning" / "gpu"
    shutil.copytree(source / "records", target / "records")
    paths = figures.regenerate(["med_tuning"], "gpu", tmp_path)
    assert sorted(p.name for p in paths) == ["dice_vs_params.png", "dice_vs_params.svg"]  # no curve tables: no curves
    for table in ("curves_table1.csv", "curves_table2.csv"):
        shutil.copy(source / table, target / table)
    paths = figures.regenerate(["med_tuning"], "gpu", tmp_path)
    assert "curves.svg" in {p.name for p in paths}
    svg = (target / "curves.svg").read_text()
    assert "Med-Tuning w/o 5×5 branch" in svg and "3D U-Net (scratch)" in svg and "Table 2: training loss" in svg
