"""Figure functions draw exactly the numbers they are given (no snapshots)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gradflow  # noqa: E402
from gradflow import plot  # noqa: E402
from gradflow.cli.figures import Config, trace_at_init  # noqa: E402
from gradflow.runs.read import read_run, read_runs, logs  # noqa: E402
from gradflow.theory import predict_direct  # noqa: E402,F401
from gradflow.theory.total import with_predictions  # noqa: E402

TOTAL = "total (ratio of medians)"


@pytest.fixture(scope="module")
def traced():
    """Two small configurations traced once: identity and lambda = 0.5 shortcuts."""
    out = {}
    for label, opts in (("identity", {}), ("scale-0.5", dict(shortcut="scale", scale=0.5))):
        out[label] = trace_at_init(Config(label, "resnet20", tuple(sorted(opts.items()))), 8, 0)
    return out


def _line(ax, label):
    lines = [l for l in ax.get_lines() if l.get_label() == label]
    assert len(lines) == 1, [l.get_label() for l in ax.get_lines()]
    return lines[0]


def _body(units):
    return units[~units["is_top"]].sort_values("unit")


def test_gradient_depth_draws_total_direct_and_prediction(traced):
    units = {k: v[0] for k, v in traced.items()}
    fig = plot.gradient_depth(units)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(units)
    for ax, (label, table) in zip(axes, units.items()):
        body = _body(with_predictions(table))
        assert ax.get_yscale() == "log"
        np.testing.assert_array_equal(_line(ax, TOTAL).get_xdata(), body["unit"])
        # the total is the ratio of batch medians (the tracer's per-unit q50 over x_L's)
        top = table[table["is_top"]].iloc[0]
        np.testing.assert_allclose(_line(ax, TOTAL).get_ydata(), body["grad_norm_q50"] / top["grad_norm_q50"])
        np.testing.assert_allclose(_line(ax, "direct term").get_ydata(),
                                   body["direct_norm_q50"] / top["grad_norm_q50"])
        # eq. (5)/(8) points only where they cover the unit: not at the two projection units
        line = _line(ax, "eq. (5)/(8), where they cover the unit (exact by construction)")
        covered = body["x_shape"].to_numpy() == np.append(body["x_shape"].to_numpy()[1:], top["x_shape"])
        np.testing.assert_array_equal(line.get_xdata(), body["unit"].to_numpy()[covered])
        assert covered.sum() == len(body) - 2
        lam = 0.5 if label == "scale-0.5" else 1.0
        # the closed form, anchored at x_L or at the projection unit above each stage
        np.testing.assert_allclose(line.get_ydata()[-2:], lam ** (len(body) - body["unit"].to_numpy()[-2:]))
    plt.close(fig)


def test_one_table_with_a_config_column_equals_a_dict(traced):
    long = pd.concat([v[0].assign(config=k) for k, v in traced.items()])
    a, b = plot.gradient_depth(long), plot.gradient_depth({k: v[0] for k, v in traced.items()})
    for ax1, ax2 in zip(a.axes, b.axes):
        np.testing.assert_array_equal(_line(ax1, TOTAL).get_ydata(), _line(ax2, TOTAL).get_ydata())
    plt.close("all")


def test_decay_rates_plot_the_fitted_slopes(traced):
    units = {k: v[0] for k, v in traced.items()}
    table = plot.decay_rate_table(units)
    scaled = table[(table["config"] == "scale-0.5") & (table["quantity"] == "prediction")]
    assert scaled["slope"].iloc[0] == pytest.approx(np.log(0.5) + table[(table["config"] == "identity") & (
        table["quantity"] == "prediction")]["slope"].iloc[0], abs=0.05)
    fig = plot.decay_rates(units)
    ax = fig.axes[0]
    for q in ("total", "direct term", "prediction"):
        container = [c for c in ax.containers if c.get_label() == q][0]
        np.testing.assert_allclose(container.lines[0].get_xdata(), table[table["quantity"] == q]["slope"])
    plt.close(fig)


def test_activation_growth_draws_x_var_and_a_per_stage_linear_fit(traced):
    units = traced["identity"][0]
    fig = plot.activation_growth({"identity": units})
    ax = fig.axes[0]
    body = _body(units)
    np.testing.assert_allclose(_line(ax, "measured Var(x_l)").get_ydata(), body["x_var"])
    fit = plot.linear_growth_fit(units)
    drawn = np.concatenate([l.get_ydata() for l in ax.get_lines() if l.get_color() == plot.COLOURS["fit"]])
    np.testing.assert_allclose(np.sort(drawn), np.sort(fit.to_numpy()))
    # the fitted slope is the theory module's
    same_group = (body["x_shape"].to_numpy()[1:] == body["x_shape"].to_numpy()[:-1])
    slopes = np.diff(fit.to_numpy())[same_group]
    np.testing.assert_allclose(slopes, gradflow.theory.variance_growth(units)["linear"]["slope"])
    plt.close(fig)


def test_cosine_distribution_draws_every_sample(traced):
    samples = traced["identity"][1]
    fig = plot.cosine_distribution({"identity": samples})
    ax = fig.axes[0]
    y = np.sort(_line(ax, "one sample").get_ydata())
    np.testing.assert_allclose(y, np.sort(samples["cos_direct_residual"].dropna()))
    med = samples.groupby("unit")["cos_direct_residual"].median().dropna()
    np.testing.assert_allclose(_line(ax, "median over samples").get_ydata(), med)
    plt.close(fig)


def _fake_run(root, name, errors, probe=None):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"config": {"model": "resnet20", "model_options": {}},
                                               "device": "cpu", "world_size": 1}))
    rows = [dict(iteration=i, train_loss=2.0 / (1 + i), train_error=0.5,
                 test_loss=None if i % 20 else 1.0, test_error=None if i % 20 else e)
            for i, e in zip(range(10, 10 * (len(errors) + 1), 10), errors)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if probe is not None:
        probe.to_csv(d / "probe.csv", index=False)
    return d


def test_training_curves_plot_the_log_columns(tmp_path):
    a = _fake_run(tmp_path, "a", [0.9, 0.8, 0.7, 0.6])
    b = _fake_run(tmp_path, "b", [0.5, 0.4, 0.3, 0.2])
    runs = read_runs([a, b])
    fig = plot.training_curves(logs(runs))
    left, right = fig.axes[0], fig.axes[1]
    for r in runs:
        loss = _line(left, f"{r.label}: training loss")
        assert loss.get_linestyle() == "--"
        np.testing.assert_allclose(loss.get_ydata(), r.log["train_loss"])
        err = _line(right, f"{r.label}: test error")
        assert err.get_linestyle() == "-"
        te = r.log.dropna(subset=["test_error"])
        np.testing.assert_allclose(err.get_xdata(), te["iteration"])
        np.testing.assert_allclose(err.get_ydata(), 100 * te["test_error"])
    plt.close(fig)
    panels = plot.training_curve_panels(runs, baseline="a")
    assert [ax.get_title() for ax in panels.axes if ax.get_title()] == ["b"]
    plt.close(panels)


def test_the_run_reader_takes_csv_and_old_column_names(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    pd.DataFrame({"iteration": [1, 2], "train_loss": [2.0, 1.0], "test_err": [np.nan, 0.4]}).to_csv(
        d / "log.csv", index=False)
    run = read_run(d)
    assert list(run.log["test_error"].dropna()) == [0.4]
    with pytest.raises(gradflow.GradflowError, match="does not exist"):
        read_run(tmp_path / "missing")


def test_gradient_flow_over_training_heatmap_and_rates(tmp_path):
    model = gradflow.create_model("resnet20")
    tables = []
    for it in (0, 5, 10):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        with gradflow.trace(model) as tr:
            F.cross_entropy(model(x), y).backward()
        tables.append(tr.units.assign(iteration=it))
    run = read_run(_fake_run(tmp_path, "p", [0.5], probe=pd.concat(tables)))
    fig = plot.gradient_flow_over_training(run.probe)
    mesh = fig.axes[0].collections[0]
    grid = plot.heatmap_table(run.probe)
    expected = np.log10(np.stack([_body(t)["grad_ratio"].to_numpy() for t in tables], axis=1))
    np.testing.assert_allclose(grid.to_numpy(), expected)
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(grid.shape), expected)
    rates = plot.decay_rate_over_training_table(run.probe)
    total = _line(fig.axes[1], "total")
    np.testing.assert_allclose(total.get_ydata(), rates[rates["quantity"] == "grad_ratio"]["slope"])
    plt.close(fig)


# --- figures whole under a plain savefig, shape-change lines, the package's lazy faces -----

def _outside(fig) -> list[str]:
    """What sticks out of the figure (what a plain savefig would clip): the drawn bounding box's overhangs.

    Drawn at the screen's 100 dpi and at the 200 dpi figures are saved at: text is wider at
    200 (hinting), and a title that fits on screen was clipped in the committed PNGs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    sides = []
    w, h = fig.get_size_inches()
    tol = 0.02
    for dpi in (100, 200):
        fig.set_dpi(dpi)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        bb = fig.get_tightbbox(canvas.get_renderer())    # inches, drawn artists only (titles, legends, labels)
        sides += [f"{side} at {dpi} dpi" for side, out in (("left", bb.x0 < -tol), ("bottom", bb.y0 < -tol),
                                                           ("right", bb.x1 > w + tol), ("top", bb.y1 > h + tol))
                  if out]
    fig.set_dpi(100)
    return sides


def test_every_figure_is_whole_under_a_plain_savefig(traced, tmp_path):
    units = {k: v[0] for k, v in traced.items()}
    one = {"identity": units["identity"]}
    run = _fake_run(tmp_path, "r", [0.5, 0.4, 0.3, 0.2], probe=traced["identity"][0].assign(iteration=10))
    figs = {"gradient_depth 1": plot.gradient_depth(one), "gradient_depth 2": plot.gradient_depth(units),
            "decay_rates": plot.decay_rates(units), "activation_growth": plot.activation_growth(one),
            "cosine": plot.cosine_distribution({"identity": traced["identity"][1]}),
            "training_curves": plot.training_curves(read_runs([run])),
            "probe_overview": plot.probe_overview(units, title="a long title " * 8),
            # long configuration names push the axes right of the figure's centre
            "decay_rates titled": plot.decay_rates({f"exclusive gate b=-{i} (a long label)": t for i, t in
                                                    enumerate(units.values())},
                                                   title="Table 1 shortcuts, ResNet-110 at init: decay rates "
                                                   "across depth (95% CI)"),
            "gradient_flow_over_training": plot.gradient_flow_over_training(
                read_runs([run])[0].probe, title="Gradient flow over training: table1-exclusive-gate-b-6-seed0 "
                "(width x0.5, 400 iterations)"),
            "decay_rate_over_training": plot.decay_rate_over_training(read_runs([run])[0].probe)}
    for name, fig in figs.items():
        assert fig.get_layout_engine() is not None, name                  # constrained layout
        assert fig.get_figwidth() >= 5.9, (name, fig.get_size_inches())   # room for a title and a legend
        assert _outside(fig) == [], name
    plt.close("all")


def test_shape_lines_sit_between_the_projection_unit_and_the_next(traced):
    model = gradflow.create_model("resnet20")
    # independent of the tables: where a unit changes channels or stride, its output has the new shape
    want = [i + 0.5 for i, u in enumerate(model.units()) if u.in_channels != u.out_channels or u.stride != 1]
    fig = plot.gradient_depth({"identity": traced["identity"][0]})
    got = sorted(l.get_xdata()[0] for l in fig.axes[0].get_lines() if l.get_linestyle() == ":"
                 and len(set(l.get_xdata())) == 1)
    assert got == want
    plt.close(fig)


def test_shape_lines_of_a_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    from gradflow.probe import synthetic, trace_once
    model = torchvision.models.resnet18(num_classes=10)
    units = trace_once(model, synthetic(2, 1, 32, seed=0)).units
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    want = [i + 0.5 for i, b in enumerate(blocks) if b.downsample is not None]
    np.testing.assert_array_equal(plot.shape_changes(units[~units["is_top"]]), want)


def test_import_gradflow_is_light_and_its_faces_load_on_use():
    import subprocess
    import sys
    code = ("import sys, gradflow; heavy = [m for m in ('pandas', 'scipy.stats', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy; gradflow.plot.gradient_depth; gradflow.theory.summarize; gradflow.trace; "
            "assert 'resnet1001' in gradflow.list_models(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_probes_figure_is_titled_with_what_was_probed():
    from gradflow.probe.config import ProbeConfig
    from gradflow.probe.run import run_probe
    result = run_probe(ProbeConfig(model="resnet20", batch_size=2, options={"unit": "original"}))
    fig = result.figure()
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "resnet20" in title and "unit=original" in title and result.inputs in title and "train mode" in title
    assert _outside(fig) == []
    plt.close(fig)
