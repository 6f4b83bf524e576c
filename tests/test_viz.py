import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from lib import viz


def test_oriented_slices_put_patient_right_on_the_left_and_superior_up():
    v = np.zeros((4, 5, 6))
    v[3, 4, 5] = 1  # right, anterior, superior corner
    assert viz.oriented_slice(v, 2, 5)[0, 0] == 1       # axial: anterior up, right on the left
    assert viz.oriented_slice(v, 1, 4)[0, 0] == 1       # coronal: superior up, right on the left
    assert viz.oriented_slice(v, 0, 3)[0, 0] == 1       # sagittal: superior up, anterior on the left
    assert viz.oriented_slice(v, 2, 5).shape == (5, 4)


def test_loss_curves_one_panel_per_stage(tmp_path):
    for stage in ("vae", "denoiser"):
        (tmp_path / "a" / stage).mkdir(parents=True)
        pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}).to_csv(tmp_path / "a" / stage / "steps.csv", index=False)
    (tmp_path / "b").mkdir()
    pd.DataFrame({"step": [1, 2], "loss": [1.0, -0.5]}).to_csv(tmp_path / "b" / "steps.csv", index=False)
    pd.DataFrame({"epoch": [1], "step": [2], "val_loss": [0.7]}).to_csv(tmp_path / "b" / "epochs.csv", index=False)
    (tmp_path / "c").mkdir()  # a short run: no step was logged, only the epoch
    pd.DataFrame({"epoch": [1, 2], "step": [2, 4], "loss": [0.5, 0.4], "val_loss": [0.6, 0.5]}).to_csv(tmp_path / "c" / "epochs.csv", index=False)
    fig = viz.loss_curves({"04": tmp_path / "a", "05": tmp_path / "b", "06": tmp_path / "c"})
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
    assert titles == ["04 / denoiser", "04 / vae", "05", "06"]
    short = next(ax for ax in fig.axes if ax.get_title() == "06")
    assert [list(line.get_ydata()) for line in short.lines] == [[0.5, 0.4], [0.6, 0.5]]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no steps.csv or epochs.csv"):
        viz.loss_curves({"x": tmp_path / "nothing"})


def test_gif_has_every_frame(tmp_path):
    from PIL import Image

    frames = [np.full((8, 8), i, np.float32) for i in range(5)]
    path = viz.save_gif(frames, tmp_path / "s.gif")
    with Image.open(path) as im:
        assert im.n_frames == 5


def test_viewers_render_and_validate():
    import ipywidgets

    v = np.random.default_rng(0).normal(size=(6, 7, 8))
    box = viz.compare_viewer({"input": v, "target": v, "error": np.abs(v)})
    assert isinstance(box, ipywidgets.VBox)
    slider = box.children[0].children[1]
    assert slider.max == 7
    box.children[0].children[0].value = 0          # switch to sagittal: the slider follows the axis
    assert slider.max == 5 and slider.value == 3
    with pytest.raises(ValueError, match="one shape"):
        viz.compare_viewer({"a": v, "b": v[:3]})
    with pytest.raises(ValueError, match="valid windows"):
        viz.slice_viewer(v, window="CT liver")


def test_slice_viewer_overlay_checks_shape_and_has_an_opacity_control():
    import ipywidgets

    v = np.zeros((6, 7, 8))
    box = viz.slice_viewer(v, overlay=(v > -1).astype(float), opacity=0.3)
    opacity = box.children[0].children[3]
    assert isinstance(opacity, ipywidgets.FloatSlider) and opacity.value == 0.3 and opacity.layout.display is None
    assert viz.slice_viewer(v).children[0].children[3].layout.display == "none"
    with pytest.raises(ValueError, match="overlay shape"):
        viz.slice_viewer(v, overlay=np.zeros((6, 7, 9)))


def test_compare_figure_shows_the_middle_slices_of_every_volume():
    v = np.zeros((6, 7, 8), np.float32)
    v[3, 3, 4] = 1.0  # the centre voxel: visible in every middle slice
    fig = viz.compare_figure({"pred": v, "target": 2 * v, "error": v}, window="auto", title="t")
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 9  # 3 axes x 3 volumes
    assert all(float(np.max(img)) > 0 for img in images)
    assert [img.shape for img in images[::3]] == [(7, 6), (8, 6), (8, 7)]  # axial, coronal, sagittal rows
    with pytest.raises(ValueError, match="compare_figure needs 3D volumes of one shape"):
        viz.compare_figure({"a": v, "b": v[:2]})


def test_results_table_figure_colours_verdicts_and_bolds_headlines():
    table = pd.DataFrame([{"family": "a", "metric": "dice", "value": 0.8, "baseline": "sub", "baseline_value": 0.7,
                           "verdict": "better than baseline", "headline": True},
                          {"family": "b", "metric": "auc", "value": 0.5, "baseline": "scratch", "baseline_value": 0.9,
                           "verdict": "WORSE than baseline", "headline": False}])
    fig = viz.results_table_figure(table)
    cells = fig.axes[0].tables[0].get_celld()
    colours = [tuple(round(c, 2) for c in cells[i, 5].get_facecolor()[:3]) for i in (1, 2)]
    assert colours[0][1] > colours[0][0] and colours[1][0] > colours[1][1]  # green, then red
    assert cells[1, 1].get_text().get_fontweight() == "bold" and cells[2, 1].get_text().get_fontweight() == "normal"
    assert cells[2, 2].get_text().get_text() == "0.5"
