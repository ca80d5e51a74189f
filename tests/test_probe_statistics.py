"""The probe's robust statistics and the predictions in its report."""
from __future__ import annotations

import numpy as np
import torch

from gradflow.probe import ProbeConfig, build_model, synthetic
from gradflow.probe.report import variant_report
from gradflow.probe.text import format_report
from gradflow.probe.run import probe_model


def test_saturated_softmax_samples_are_named_and_do_not_drive_the_headline():
    built = build_model("resnet20", dict(unit="original"), seed=0)   # no BN in the head: samples apart
    with torch.no_grad():
        built.module.fc.weight.mul_(100.0)    # logits so large that the softmax saturates
    for seed in range(30):                    # a batch where a few labels equal the argmax
        inputs = synthetic(16, 1, 32, seed)
        (x, y), = inputs
        built.module.train()
        with torch.no_grad():
            hit = (built.module(x).argmax(1) == y % 10).numpy()
        if 1 <= hit.sum() <= 4:
            break
    cfg = ProbeConfig(model="resnet20", options=dict(unit="original"), batch_size=16, seed=seed, progress=False)
    v = probe_model(built, inputs, cfg, torch.device("cpu"), "saturated")
    named = sorted(d["sample"] for d in v.analysis["degenerate"])
    assert named == sorted(np.flatnonzero(hit).tolist())       # exactly the saturated samples
    rep = variant_report(v)
    assert f"{len(named)} of 16 samples have a degenerate" in rep["verdicts"]["samples"]
    # the headline is the ratio of medians; the mean beside it is set by the degenerate samples
    f = rep["finding"]
    assert np.isfinite(f["total_change"])
    assert f["total_mean"] is None or f["total_mean"] > 100 * f["total_change"]   # None: infinite
    text = format_report({"inputs": "x", "config": dict(mode="train", device="cpu", seed=0, batch_size=16,
                                                         batches=1, image_size=32), "variants": [rep]})
    assert "samples: " in text and "degenerate" in text


def test_report_predictions_are_computed_without_the_measured_gradient():
    """With every gradient column blanked, mean field and isotropy are unchanged: they read forwards and
    Jacobians only."""
    from gradflow.probe import run_probe
    from gradflow.theory.total import predict_total
    res = run_probe(ProbeConfig(model="resnet20", batch_size=4, progress=False))
    v = next(iter(res.variants.values()))
    base = v.units.drop(columns=["iso_ratio", "mf_factor", "mf_anchor", "mf_basis", "gsc"])
    blank = base.copy()
    for c in [c for c in base if c.startswith(("grad_", "direct_", "residual_", "cos_"))]:
        blank[c] = np.nan
    a, b = predict_total(base), predict_total(blank)
    assert a["iso_ratio"].notna().all() and a["mf_factor"].notna().sum() >= 6
    np.testing.assert_array_equal(a["iso_ratio"].to_numpy(), b["iso_ratio"].to_numpy())
    np.testing.assert_array_equal(a["mf_factor"].to_numpy(), b["mf_factor"].to_numpy())
    rep = variant_report(v)
    assert {p["name"] for p in rep["predictions"]} == {"isotropy", "mean field", "gradient scale coefficient"}
