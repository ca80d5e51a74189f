"""The zoo's predictions table (gradflow.probe.zoo) against plain autograd and its own counting rule."""
import numpy as np
import pandas as pd
import pytest
import torch

from gradflow.probe.inputs import synthetic
from gradflow.probe.models import build_model
from gradflow.probe.zoo import Network, held_table, to_markdown, zoo_predictions
from gradflow.theory.batchnorm import plain_bn_relu_growth


def _keep(seen, key, t):
    t.retain_grad()
    seen[key] = t          # returns None: the hook changes nothing


def _per_sample_grads(model, x, y, modules, top):
    """||dE/dx|| per sample at each module's input and at ``top``'s output, by retain_grad (no gradflow)."""
    seen, handles = {}, []
    for i, mod in enumerate(modules):
        handles.append(mod.register_forward_pre_hook(lambda m, a, i=i: _keep(seen, i, a[0])))
    handles.append(top.register_forward_hook(lambda m, a, o: _keep(seen, "top", o)))
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y % logits.shape[1]).backward()   # the probe's labels
    for h in handles:
        h.remove()
    norm = lambda t: t.grad.flatten(1).norm(dim=1).double()
    return [norm(seen[i]) for i in range(len(modules))], norm(seen["top"])


@pytest.mark.usefixtures("one_thread")
def test_a_stage_growth_is_the_ratio_of_batch_medians_and_rms_norms_from_autograd():
    net = Network("r20", "resnet20", {"unit": "full_preact"})
    rows = zoo_predictions([0], [net], batch_size=8)
    m = build_model("resnet20", {"unit": "full_preact"}, 0).module
    x, y = synthetic(8, 1, 32, 0).batches[0]
    stage = list(m.stages[1])
    g, top = _per_sample_grads(m, x, y, stage, m.stages[-1][-1])
    med = [float(np.median(gi.numpy()) / np.median(top.numpy())) for gi in g]    # ratio of batch medians
    rms = [float(gi.pow(2).mean().sqrt() / top.pow(2).mean().sqrt()) for gi in g]
    mf = rows[(rows["prediction"] == "meanfield") & (rows["stage"] == 1)].iloc[0]
    iso = rows[(rows["prediction"] == "isotropy") & (rows["stage"] == 1)].iloc[0]
    # the stage's own units: its first unit reshapes (a projection), so the run starts at the second
    assert mf["measured"] == pytest.approx(med[1] / med[-1], rel=1e-5)
    assert iso["measured"] == pytest.approx(rms[1] / rms[-1], rel=1e-5)
    assert mf["held"] == (abs(np.log(mf["predicted"] / mf["measured"])) <= np.log(1.5))


@pytest.mark.usefixtures("one_thread")
def test_the_plain_net_row_is_the_first_stage_growth_against_yangs_rate():
    net = Network("p20", "plain20", plain=True)
    row = zoo_predictions([1], [net], batch_size=8).query("prediction == 'yang2019'").iloc[0]
    m = build_model("plain20", {}, 1).module
    x, y = synthetic(8, 1, 32, 1).batches[0]
    g, top = _per_sample_grads(m, x, y, list(m.stages[0]), m.stages[-1][-1])
    # the batch-level ratio: ||dE/dx_first|| / ||dE/dx_last|| over the whole batch
    ratio = lambda gi: float(gi.pow(2).sum().sqrt() / top.pow(2).sum().sqrt())
    assert row["predicted"] == pytest.approx(plain_bn_relu_growth(2) ** (len(g) - 1))
    assert row["measured"] == pytest.approx(ratio(g[0]) / ratio(g[-1]), rel=1e-4)


def test_held_counts_within_x1_5_and_names_why_a_prediction_does_not_apply():
    rows = pd.DataFrame([
        dict(network="a", seed=0, prediction="meanfield", stage=0, predicted=1.4, measured=1.0, ratio=1.4,
             held=True, not_applied=""),
        dict(network="a", seed=1, prediction="meanfield", stage=0, predicted=1.6, measured=1.0, ratio=1.6,
             held=False, not_applied=""),
        dict(network="b", seed=0, prediction="meanfield", stage=0, predicted=None, measured=2.0, ratio=None,
             held=None, not_applied="f is not the identity"),
        dict(network="a", seed=0, prediction="eq5", stage=None, predicted=None, measured=None, ratio=None,
             held=None, not_applied="exact by construction at 3 of 4 units")])
    table, reasons = held_table(rows)
    cell = table.set_index("prediction").loc[lambda t: t.index.str.startswith("total's growth over a stage = sqrt")]
    assert cell["a"].iloc[0] == "held 1/2 (x1.4..1.6)" and cell["b"].iloc[0] == "n/a [1]"
    assert reasons == ["f is not the identity"]
    assert "exact at 3 of 4 units (by construction)" in table["a"].tolist()
    md = to_markdown(table, reasons, [0, 1], "cmd")
    assert "[1] f is not the identity" in md and "held 1/2" in md


def test_figures_names_the_table_and_refuses_no_seeds(capsys):
    from gradflow.cli.figures import main
    assert main(["--zoo-seeds", "0", "--only", "predictions_zoo"]) == 2
    assert "--zoo-seeds 0" in capsys.readouterr().err
    assert main(["--list", "--only", "predictions_*"]) == 0
    assert capsys.readouterr().out.startswith("predictions_zoo ")
