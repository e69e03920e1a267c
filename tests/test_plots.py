"""cisslib.report (tables, figures) and cisslib.runs.load_runs on fabricated run folders
(tests/fixtures_runs.py): tables against hand-worked numbers, figures by their axes and lines."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run, write_two_runs  # noqa: E402

from cisslib import report as plots  # noqa: E402
from cisslib.report.grid import curves_with_bands  # noqa: E402
from cisslib.runs import TABLES  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_two_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def data(runs: list[Path]) -> dict[str, pd.DataFrame]:
    return plots.load_runs(runs)


def _data_lines(ax) -> list:
    return [line for line in ax.lines if not line.get_label().startswith("_")]


# ---------------------------------------------------------------------------------- loading
def test_load_runs_concatenates(data):
    # 2 runs x 3 steps x 2 conventions
    assert len(data["summary"]) == 12
    # per run: fg_only 2+3+4 rows, with_bg 3+4+5 rows -> 21
    assert len(data["per_class"]) == 42
    assert set(data["summary"]["run"]) == {"toy_full", "toy_finetune"}
    assert data["shift"]["seen"].dtype == bool
    written = {"losses", "summary", "per_class", "zero_shot", "shift"}  # what the fixture writes
    assert {k for k in TABLES if data[k].attrs["missing"] == []} == written
    for key in set(TABLES) - written:  # absent tables: every folder listed, the schema's columns
        assert len(data[key].attrs["missing"]) == 2 and data[key].empty
        assert list(data[key].columns) == list(TABLES[key])


def test_load_runs_missing_summary_names_folder(tmp_path):
    bad = tmp_path / "not_a_run"
    bad.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run: no metrics/summary.csv"):
        plots.load_runs([bad])


def test_load_runs_missing_column_names_file(tmp_path):
    run = write_fake_run(tmp_path, "full")
    pc = pd.read_csv(run / "metrics/per_class.csv").drop(columns=["iou"])
    pc.to_csv(run / "metrics/per_class.csv", index=False)
    with pytest.raises(ValueError, match=r"per_class.csv: missing column\(s\) \['iou'\]"):
        plots.load_runs(run)


def test_load_runs_duplicate_run_names(tmp_path):
    from cisslib import runs as run_tables

    a = write_fake_run(tmp_path / "demo", "full", run="full")
    b = write_fake_run(tmp_path / "demo_real", "full", run="full")
    with pytest.raises(ValueError, match="run name 'full' appears in both"):
        run_tables.load_runs([a, b])
    d = plots.load_runs([a, b, a])  # the report relabels (and reads a folder once)
    assert list(d["runs"]["run"]) == ["demo/full", "demo_real/full"]
    for key in ("summary", "per_class", "zero_shot", "shift", "losses"):
        assert set(d[key]["run"]) == {"demo/full", "demo_real/full"}, key
    assert len(d["summary"]) == 12
    assert d["summary"].attrs["tau"] == {"demo/full": 0.4, "demo_real/full": 0.4}
    fig = plots.forgetting_curves(d["summary"])
    assert len(_data_lines(fig.axes[0])) == 2  # two lines, not one merged line


def test_unique_labels_keep_distinct_names():
    from cisslib.report.loading import unique_labels

    folders = [Path("/x/a/run"), Path("/x/b/run"), Path("/x/c/other")]
    assert unique_labels(["run", "run", "other"], folders) == ["a/run", "b/run", "other"]
    assert unique_labels(["same", "same"], [Path("/p/x"), Path("/p/y")]) == [
        "x (same)", "y (same)"
    ]  # fmt: skip


def test_absent_probes_give_notes_not_crashes(tmp_path, runs):
    bare = write_fake_run(tmp_path, "finetune", run="bare", zero_shot=False, shift=False)
    d = plots.load_runs([bare])
    assert d["zero_shot"].empty and d["shift"].empty
    assert d["zero_shot"].attrs["missing"] == [str(bare)]
    for fig in (plots.zero_shot_curves(d["zero_shot"]), plots.semantic_shift_plots(d["shift"])):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("absent" in t for t in texts)
    assert plots.zero_shot_table(d["zero_shot"]).empty
    # Mixed: one run with the probe, one without -> the curve shows one run and names the other.
    mixed = plots.load_runs([runs[0], bare])
    fig = plots.zero_shot_curves(mixed["zero_shot"])
    assert len(_data_lines(fig.axes[0])) == 1
    assert "absent in: bare" in fig.axes[0].get_title()


# ---------------------------------------------------------------------------------- tables
def test_results_table_hand_numbers(data):
    t = plots.results_table(data["summary"], "fg_only")
    assert list(t.index) == ["full", "finetune"]
    # full, step 2: old = (0.4 + 0.6 + 0.4) / 3, new = 0.3, all = 1.7 / 4
    assert t.loc["full", "mIoU_old"] == pytest.approx(1.4 / 3)
    assert t.loc["full", "mIoU_new"] == pytest.approx(0.3)
    assert t.loc["full", "mIoU"] == pytest.approx(0.425)
    # finetune, step 2: old = (0.2 + 0.1 + 0.2) / 3, new = 0.9, all = 1.4 / 4
    assert t.loc["finetune", "mIoU_old"] == pytest.approx(0.5 / 3)
    assert t.loc["finetune", "mIoU_new"] == pytest.approx(0.9)
    assert t.loc["finetune", "mIoU"] == pytest.approx(0.35)
    assert t.loc["finetune", "step"] == 2 and t.loc["finetune", "n_runs"] == 1
    # with_bg, finetune: bg 0.8 + fg (0.1, 0.0, 0.1, 0.8) -> all = 1.8 / 5
    wb = plots.results_table(data["summary"], "with_bg")
    assert wb.loc["finetune", "mIoU"] == pytest.approx(0.36)


def test_results_table_averages_seeds(tmp_path):
    a = write_fake_run(tmp_path, "full", run="full_s0", seed=0)
    b = write_fake_run(tmp_path, "full", run="full_s1", seed=1)
    t = plots.results_table(plots.load_runs([a, b])["summary"])
    assert t.loc["full", "n_runs"] == 2
    assert t.loc["full", "mIoU"] == pytest.approx(0.425)


def test_forgetting_table_hand_numbers(data):
    t = plots.forgetting_table(data["per_class"], "fg_only").set_index(["run", "class_name"])
    circle = t.loc[("toy_finetune", "circle")]
    assert circle["iou_learned"] == pytest.approx(0.6)
    assert circle["iou_last"] == pytest.approx(0.2)
    assert circle["forgetting"] == pytest.approx(0.4)  # 0.6 - 0.2
    assert t.loc[("toy_finetune", "square"), "forgetting"] == pytest.approx(0.7)  # 0.8 - 0.1
    assert t.loc[("toy_finetune", "triangle"), "forgetting"] == pytest.approx(0.5)  # 0.7 - 0.2
    assert t.loc[("toy_finetune", "star"), "forgetting"] == pytest.approx(0.0)  # learned last
    assert t.loc[("toy_full", "triangle"), "forgetting"] == pytest.approx(0.1)  # 0.5 - 0.4
    assert len(t) == 8
    wb = plots.forgetting_table(data["per_class"], "with_bg").set_index(["run", "class_name"])
    assert wb.loc[("toy_full", "background"), "forgetting"] == pytest.approx(0.0)
    assert wb.loc[("toy_full", "square"), "iou_learned"] == pytest.approx(0.7)


def test_forgetting_table_nan_iou(data):
    pc = data["per_class"].copy()
    sel = (pc["run"] == "toy_full") & (pc["class_name"] == "circle") & (pc["step"] == 2)
    pc.loc[sel, "iou"] = math.nan
    t = plots.forgetting_table(pc).set_index(["run", "class_name"])
    assert math.isnan(t.loc[("toy_full", "circle"), "forgetting"])


def test_probe_tables_hand_numbers(data):
    z = plots.zero_shot_table(data["zero_shot"]).set_index(["run", "step"])
    assert z.loc[("toy_full", 0), "mIoU_future"] == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert z.loc[("toy_full", 0), "n_classes"] == 2
    assert z.loc[("toy_finetune", 1), "mIoU_future"] == pytest.approx(0.05)
    s = plots.shift_table(data["shift"]).set_index(["run", "step", "seen"])
    assert s.loc[("toy_finetune", 2, True), "text_cos"] == pytest.approx(0.2)  # 0.3 - 2 * 0.05
    assert s.loc[("toy_finetune", 1, False), "n_classes"] == 1  # only the star is future
    assert s.loc[("toy_full", 1, True), "drift_cos"] == pytest.approx(0.9)


def test_summary_table_mean_std_over_seeds(tmp_path):
    a = write_fake_run(tmp_path, "full", run="full_s0", seed=0)
    b = write_fake_run(tmp_path, "full", run="full_s1", seed=1)
    summary = pd.read_csv(b / "metrics" / "summary.csv")
    summary.loc[(summary["step"] == 2) & (summary["convention"] == "fg_only"), "mIoU_new"] = 0.5
    summary.to_csv(b / "metrics" / "summary.csv", index=False)
    c = write_fake_run(tmp_path, "finetune", seed=0)
    t = plots.summary_table(plots.load_runs([a, b, c])["summary"])
    assert list(t.index) == ["full", "finetune"]
    full = t.loc["full"]
    assert full[("", "runs")] == 2 and full[("", "seeds")] == "0, 1"
    assert full[("fg_only", "old")] == "46.7 ± 0.0"  # 1.4 / 3 in both seeds
    # new: 0.3 and 0.5 -> mean 40.0, sample std sqrt(2 * 10^2 / 1) = 14.1
    assert full[("fg_only", "new")] == "40.0 ± 14.1"
    assert full[("with_bg, tau = 0.4", "all")] == "44.0 ± 0.0"  # (0.9 + 0.5 + 0.3 + 0.1 + 0.4) / 5
    assert t.loc["finetune", ("fg_only", "all")] == "35.0"  # one run: no ± part
    html = plots.styled(t, plots.summary_note(summary.assign(run="x"))).to_html()
    assert "with_bg, tau = 0.4" in html and "mean ± std" in html


def test_summary_table_keeps_runs_with_the_same_seed_apart(tmp_path):
    a = write_fake_run(tmp_path / "demo", "full", run="full")
    b = write_fake_run(tmp_path / "demo_real", "full", run="full")
    t = plots.summary_table(plots.load_runs([a, b])["summary"])
    assert list(t.index) == ["demo/full", "demo_real/full"]  # not averaged as if seeds


def test_styled_shows_iou_in_percent(data):
    t = plots.results_table(data["summary"], "fg_only")
    html = plots.styled(t, plots.convention_note("fg_only")).to_html()
    assert "46.7" in html and "0.467" not in html  # full mIoU_old = 1.4 / 3
    assert "mIoU_old (%)" in html and "n_runs (%)" not in html
    assert "fg_only: every pixel is the argmax over the seen classes" in html
    shift = plots.styled(plots.shift_table(data["shift"])).to_html()
    assert "0.900" in shift  # cosines stay as they are
    note = plots.convention_note("with_bg", data["summary"])
    assert note.startswith("with_bg (tau = 0.4)")
    assert plots.convention_note("with_bg", {"a": 0.4, "b": 0.5}).startswith(
        "with_bg (tau = 0.4 (a), 0.5 (b))"
    )


def test_bad_convention_is_one_line(data):
    with pytest.raises(ValueError, match="convention 'bg' unknown"):
        plots.results_table(data["summary"], "bg")


# ---------------------------------------------------------------------------------- figures
def test_forgetting_curves(data):
    fig = plots.forgetting_curves(data["summary"], "fg_only")
    assert len(fig.axes) == 4
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles == ["mIoU_base", "mIoU_old", "mIoU_new", "mIoU"]
    for ax in fig.axes:
        assert len(_data_lines(ax)) == 2
        assert ax.get_ylim() == (0, 100)
    # mIoU_new of finetune in %: 70 (mean of 0.6, 0.8), 70, 90
    line = next(ln for ln in fig.axes[2].lines if ln.get_label().startswith("toy_finetune"))
    np.testing.assert_allclose(line.get_ydata(), [70, 70, 90])
    np.testing.assert_allclose(line.get_xdata(), [0, 1, 2])
    assert fig.axes[0].get_ylabel() == "mIoU (%), fg_only"
    assert "argmax over the seen classes" in fig._supxlabel.get_text()
    wb = plots.forgetting_curves(data["summary"], "with_bg")
    assert wb.axes[0].get_ylabel() == "mIoU (%), with_bg, tau = 0.4"


def test_a_one_step_run_is_a_level_in_the_all_classes_panel(tmp_path, runs):
    """joint beside incremental runs: a dashed horizontal line at its mIoU in the last panel,
    absent from the panels whose class groups it does not share."""
    joint = write_fake_run(tmp_path, "full", run="joint")
    summary = pd.read_csv(joint / "metrics" / "summary.csv")
    summary = summary[summary["step"] == 0].assign(preset="joint")
    summary.loc[summary["convention"] == "fg_only", "mIoU"] = 0.55
    summary.to_csv(joint / "metrics" / "summary.csv", index=False)
    d = plots.load_runs([*runs, joint])
    fig = plots.forgetting_curves(d["summary"], "fg_only")
    for ax in fig.axes[:3]:
        labels = [ln.get_label() for ln in _data_lines(ax)]
        assert len(labels) == 2 and not any(lab.startswith("joint") for lab in labels)
    level = next(ln for ln in fig.axes[3].lines if ln.get_label().endswith("(one step)"))
    assert level.get_linestyle() == "--"
    np.testing.assert_allclose(level.get_ydata(), [55, 55])
    assert len(_data_lines(fig.axes[3])) == 3


def test_a_preset_has_one_colour_in_the_curves_and_the_bands(tmp_path):
    """The demo's runs are named after their presets: each is drawn in the same colour in the
    forgetting curves and in the mean +- std bands, whatever order the folders come in."""
    folders = [write_fake_run(tmp_path, p, run=p) for p in ("full", "finetune")]
    d = plots.load_runs(folders)
    curves = plots.forgetting_curves(d["summary"], "fg_only")
    bands = curves_with_bands(d["summary"], "fg_only")
    per_run = {ln.get_label(): ln.get_color() for ln in _data_lines(curves.axes[3])}
    per_preset = {
        ln.get_label().split(" (n=")[0]: ln.get_color() for ln in _data_lines(bands.axes[2])
    }
    assert set(per_run) == set(per_preset) == {"full", "finetune"}
    assert per_run == per_preset and per_run["full"] != per_run["finetune"]


def test_calibrated_tau_labels_the_with_bg_figures(tmp_path):
    run = write_fake_run(tmp_path, "full", run="calibrated")
    cfg = (
        (run / "config.yaml").read_text().replace("  tau: 0.4\n", "  tau: 0.4\n  tau_from: train\n")
    )
    (run / "config.yaml").write_text(cfg)
    assert plots.load_runs(run)["runs"]["tau"].isna().all()  # chosen after step 0: not yet
    rows = "run,preset,step,tau,tau_from,images,miou_with_bg\n"
    rows += "calibrated,full,0,0.15,train step 0,100,0.3\ncalibrated,full,1,0.15,step 0,0,\n"
    (run / "metrics" / "threshold.csv").write_text(rows)
    d = plots.load_runs(run)
    assert d["runs"]["tau"].tolist() == [0.15]
    wb = plots.forgetting_curves(d["summary"], "with_bg")
    assert wb.axes[0].get_ylabel() == "mIoU (%), with_bg, tau = 0.15"


def test_per_class_heatmap(data):
    fig = plots.per_class_heatmap(data["per_class"], "toy_finetune", "fg_only")
    assert len(fig.axes) == 2  # heatmap + colorbar
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "1: circle", "2: square", "3: triangle", "4: star"
    ]  # fmt: skip
    grid = np.ma.filled(ax.collections[0].get_array().astype(float), np.nan).reshape(4, 3)
    np.testing.assert_allclose(grid[0], [60, 30, 20])
    assert np.isnan(grid[3, 0]) and np.isnan(grid[3, 1]) and grid[3, 2] == pytest.approx(90)
    assert fig.axes[1].get_ylabel() == "IoU (%)"
    wb = plots.per_class_heatmap(data["per_class"], "toy_full", "with_bg")
    assert len(wb.axes[0].get_yticklabels()) == 5
    assert wb.axes[0].get_title() == "toy_full: per-class IoU (%), with_bg, tau = 0.4"
    with pytest.raises(ValueError, match=r"run 'nope' not in per_class table; available"):
        plots.per_class_heatmap(data["per_class"], "nope", "fg_only")


def test_zero_shot_curves(data):
    fig = plots.zero_shot_curves(data["zero_shot"])
    assert len(fig.axes) == 1
    lines = _data_lines(fig.axes[0])
    assert len(lines) == 2
    full = next(ln for ln in lines if ln.get_label().startswith("toy_full"))
    np.testing.assert_allclose(full.get_ydata(), [15, 30])
    assert fig.axes[0].get_ylabel() == "mean IoU of future classes (%), fg_only"


def test_semantic_shift_plots(data):
    fig = plots.semantic_shift_plots(data["shift"])
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(_data_lines(ax)) == 4  # 2 runs x (seen, future)
    drift = {ln.get_label(): ln for ln in fig.axes[1].lines}
    np.testing.assert_allclose(drift["toy_finetune (finetune), seen"].get_ydata(), [1.0, 0.8, 0.6])
    assert drift["toy_full (full), future"].get_linestyle() == "--"


def test_loss_curves(data):
    fig = plots.loss_curves(data["losses"])
    assert [ax.get_title() for ax in fig.axes] == ["focal", "dice"]
    for ax in fig.axes:
        assert len(_data_lines(ax)) == 2
    focal = next(ln for ln in fig.axes[0].lines if ln.get_label().startswith("toy_full"))
    # iterations 0, 10, 20 per step; step t starts one past the previous step's last iteration
    np.testing.assert_allclose(focal.get_xdata(), [0, 10, 20, 21, 31, 41, 42, 52, 62])
    assert focal.get_ydata()[3] == pytest.approx(1.1)  # 1 / (1 + 0) + 0.1 * 1


def test_loss_curves_keeps_global_iterations(data):
    losses = data["losses"].copy()
    losses["iter"] = losses["iter"] + 100 * losses["step"]  # already global
    fig = plots.loss_curves(losses)
    focal = next(ln for ln in fig.axes[0].lines if ln.get_label().startswith("toy_full"))
    np.testing.assert_allclose(focal.get_xdata(), [0, 10, 20, 100, 110, 120, 200, 210, 220])


def test_palette_and_colorize():
    pal = plots.palette(3)
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[255]) == (255, 255, 255)
    assert len({tuple(c) for c in pal[1:4]}) == 3
    labels = np.array([[0, 1], [2, 255]])
    rgb = plots.colorize(labels, 3)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[1, 1]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[0, 1]) == tuple(pal[1])
    assert len({tuple(c) for c in plots.palette(150)[1:151]}) == 150


def test_toy_classes_are_drawn_in_their_colours():
    from cisslib.data.toyworld import TOY_CLASSES, TOY_COLOURS

    names = ["green circle", "green ring", "red cross", "yellow bar"]
    pal = plots.class_palette(names)
    assert tuple(pal[1]) == TOY_COLOURS["green"]  # circle: the colour itself
    r, g, b = (int(v) for v in pal[2])  # ring: lighter green, still green
    assert g > r and g > b and g >= TOY_COLOURS["green"][1]
    assert tuple(pal[3]) == tuple(round(0.8 * v) for v in TOY_COLOURS["red"])  # cross: darker
    assert len({tuple(pal[k]) for k in range(1, 5)}) == 4
    full = plots.class_palette(TOY_CLASSES)
    assert len({tuple(full[k]) for k in range(1, 21)}) == 20  # every toy class distinct
    for k, name in enumerate(TOY_CLASSES, start=1):  # the dominant channel is the colour's
        want = int(np.argmax(TOY_COLOURS[name.split()[0]]))
        assert int(np.argmax(full[k])) == want, name
    other = plots.class_palette(["aeroplane", "bicycle"])
    np.testing.assert_array_equal(other, plots.palette(2))
    image = np.zeros((2, 2, 3), np.uint8)
    labels = np.array([[0, 1], [2, 255]])
    fig = plots.show_example(image, labels, labels, None, ["green circle", "green ring"])
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array()[0, 1], TOY_COLOURS["green"])


def test_show_example():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    gt = np.zeros((6, 8), dtype=np.int64)
    gt[:3] = 2
    gt[0, 0] = 255
    pred = np.ones((6, 8), dtype=np.int64)
    scores = np.stack([np.full((6, 8), 0.25), np.full((6, 8), 0.75)])
    fig = plots.show_example(image, gt, pred, scores, ["circle", "square"], 2)
    assert len(fig.axes) == 5  # image, gt, pred, score map + its colorbar
    assert [ax.get_title() for ax in fig.axes[:4]] == [
        "image", "ground truth", "prediction", "score: square"
    ]  # fmt: skip
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), image)
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), plots.colorize(gt, 2))
    np.testing.assert_allclose(fig.axes[3].images[0].get_array(), 0.75)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["0: background", "1: circle", "2: square", "255: void"]
    # default class: most frequent predicted label (1); no scores -> three panels
    assert plots.show_example(image, gt, pred, scores, ["circle", "square"]).axes[
        3
    ].get_title() == ("score: circle")
    assert len(plots.show_example(image, gt, pred, None, ["circle", "square"]).axes) == 3
    with pytest.raises(ValueError, match=r"scores must be \(C=3, H, W\)"):
        plots.show_example(image, gt, pred, scores, ["a", "b", "c"])
