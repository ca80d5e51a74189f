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
from gradflow.figures import Config, trace_at_init  # noqa: E402
from gradflow.runs import read_run, read_runs, logs  # noqa: E402
from gradflow.theory import predict_direct  # noqa: E402


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
        body = _body(predict_direct(table))
        assert ax.get_yscale() == "log"
        np.testing.assert_array_equal(_line(ax, "total").get_xdata(), body["unit"])
        np.testing.assert_allclose(_line(ax, "total").get_ydata(), body["grad_ratio"])
        np.testing.assert_allclose(_line(ax, "direct term").get_ydata(), body["direct_ratio"])
        np.testing.assert_allclose(_line(ax, "prediction, eq. (5)/(8)").get_ydata(), body["pred_direct_ratio"])
    plt.close(fig)


def test_one_table_with_a_config_column_equals_a_dict(traced):
    long = pd.concat([v[0].assign(config=k) for k, v in traced.items()])
    a, b = plot.gradient_depth(long), plot.gradient_depth({k: v[0] for k, v in traced.items()})
    for ax1, ax2 in zip(a.axes, b.axes):
        np.testing.assert_array_equal(_line(ax1, "total").get_ydata(), _line(ax2, "total").get_ydata())
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
