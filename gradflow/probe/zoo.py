"""Which predictions gradflow makes, from which papers, and how well each held on the zoo.

``zoo_predictions()`` probes a fixed set of networks at initialisation over
several seeds and puts each prediction of docs/theory.md beside the measurement
it predicts, per stage; ``held_table()`` condenses that to one cell per
(prediction, network): the range of prediction / measured over stages and
seeds, and in how many of them it held within x1.5 (the report's tolerance,
:data:`gradflow.probe.report.ISO_TOL`). A prediction whose assumptions a
network does not meet is not judged there: its cell says why. The direct
term's eq. (5)/(8) is listed for what it is, exact by construction where it
applies (a check of the split, never a finding). ``python -m gradflow figures``
writes the long table (``predictions_zoo.csv``) and the condensed one
(``predictions_zoo.md``, the README's table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from gradflow.probe.report import ISO_TOL, report_dict
from gradflow.theory.batchnorm import plain_bn_relu_growth
from gradflow.theory.profile import FIT_R2
from gradflow.theory.total import MF_EXPONENT


@dataclass(frozen=True)
class Network:
    label: str
    model: str
    options: dict = field(default_factory=dict)
    plain: bool = False          # no shortcut: the probe refuses it; Yang et al. 2019's rate is measured instead


ZOO = (Network("resnet110", "resnet110"),
       Network("resnet1001 original", "resnet1001", {"unit": "original"}),
       Network("resnet1001 pre-act", "resnet1001", {"unit": "full_preact"}),
       Network("gpt-small post-LN", "gpt-small", {"unit": "post_ln"}),
       Network("gpt-small DeepNorm", "gpt-small", {"unit": "deepnorm"}),
       Network("torchvision resnet50", "torchvision:resnet50"),
       Network("plain110 (no shortcut)", "plain110", plain=True))

# key -> (what is predicted, the papers it comes from, what it assumes)
PREDICTIONS = {
    "eq5": ("direct term = prod(lambda) (eq. 5/8)", "He et al. 2016",
            "h a scalar multiple, f the identity; exact by construction there: checks the split, not a finding"),
    "meanfield": ("total's growth over a stage = sqrt(Var(x_top)/Var(x_l))", "Yang & Schoenholz 2017",
                  "h a scalar multiple, f the identity, branch gain^2 = Var(F)/Var(x_l)"),
    "exponent": ("total ~ Var(x_l)^(-1/2) within a stage (power law, not exponential)",
                 "Yang & Schoenholz 2017", "as mean field; judged where a power law fits, by its 95% interval"),
    "variance": ("Var(x_l) grows linearly in depth", "De & Smith 2020", "pre-activation units with BatchNorm"),
    "isotropy": ("total's growth over a stage = prod of the units' random-direction gains", "free independence",
                 "the gradient is isotropic for each unit's Jacobian (any network)"),
    "yang2019": ("||dE/dx|| grows sqrt(pi/(pi-1)) per BN-ReLU layer", "Yang et al. 2019",
                 "no shortcut, large width and batch, ReLU inputs"),
}


def zoo_predictions(seeds: Sequence[int] = (0, 1, 2), networks: Sequence[Network] = ZOO,
                    device: str = "cpu", batch_size: Optional[int] = None) -> pd.DataFrame:
    """One row per (network, seed, prediction, stage): predicted, measured, their ratio, held or why not."""
    rows = []
    for net in networks:
        for seed in seeds:
            rows += (_plain_rows if net.plain else _probe_rows)(net, seed, device, batch_size)
    return pd.DataFrame(rows)


def _row(net: Network, seed: int, key: str, stage=None, predicted=None, measured=None, why: str = "",
         held: Optional[bool] = None) -> dict:
    ratio = predicted / measured if predicted and measured and predicted > 0 and measured > 0 else None
    if held is None and ratio is not None and not why:
        held = abs(math.log(ratio)) <= ISO_TOL
    return dict(network=net.label, seed=seed, prediction=key, stage=stage, predicted=predicted, measured=measured,
                ratio=ratio, held=held, not_applied=why)


def _probe_rows(net: Network, seed: int, device: str, batch_size: Optional[int]) -> list[dict]:
    from gradflow.probe.config import ProbeConfig
    from gradflow.probe.run import run_probe
    result = run_probe(ProbeConfig(model=net.model, options=dict(net.options), seed=seed, device=device,
                                   batch_size=batch_size, progress=False))
    v = report_dict(result)["variants"][0]
    cov = v["coverage"]
    why_not = "; ".join(k.removeprefix("not covered: ") for k in cov["not_covered"]) or "not covered"
    rows = [_row(net, seed, "eq5", why=(f"exact by construction at {cov['covered']} of {cov['units']} units"
                                        if cov["covered"] else why_not))]
    for s in v["stages"]:
        st = s["stage"]
        if s["growth"] is None:
            rows.append(_row(net, seed, "meanfield", st, why="one unit in the stage"))
            continue
        rows.append(_row(net, seed, "meanfield", st, s["meanfield"], s["growth"],
                         "" if s["meanfield"] is not None else why_not))
        rows.append(_row(net, seed, "isotropy", st, s["isotropy"], s["growth_rms"]))
        fit = s.get("fit") or {}
        if s["meanfield"] is None:
            rows.append(_row(net, seed, "exponent", st, why=why_not))
        elif fit.get("better") != "power law":
            rows.append(_row(net, seed, "exponent", st, why=f"no power law fits ({fit.get('why', 'no fit')})"))
        else:
            f = fit["power law"]
            rows.append(_row(net, seed, "exponent", st, MF_EXPONENT, f["slope"],
                             held=bool(f["ci_low"] <= MF_EXPONENT <= f["ci_high"])))
    rows.append(_variance_row(net, seed, v, cov))
    rows.append(_row(net, seed, "yang2019", why="residual units: the shortcut adds the identity to the Jacobian"))
    return rows


def _variance_row(net: Network, seed: int, v: dict, cov: dict) -> dict:
    var = (v.get("summary") or {}).get("variance")
    if not cov["covered"] or not _has_batchnorm(net):
        return _row(net, seed, "variance", why="not pre-activation units with BatchNorm")
    if not var:
        return _row(net, seed, "variance", why="no Var(x_l) recorded")
    lin, exp = var["linear"]["r2"], var["log"]["r2"]
    return _row(net, seed, "variance", measured=lin, held=bool(lin >= exp and lin >= FIT_R2))


def _has_batchnorm(net: Network) -> bool:
    from gradflow.probe.models import build_model
    m = build_model(net.model, dict(net.options), 0).module
    return any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _plain_rows(net: Network, seed: int, device: str, batch_size: Optional[int]) -> list[dict]:
    """Yang et al. 2019 on a plain net of the zoo: the first stage's growth against rate^(units - 1)."""
    import gradflow
    from gradflow.probe.inputs import synthetic
    from gradflow.probe.models import build_model
    m = build_model(net.model, dict(net.options), seed).module.to(device)
    x, y = synthetic(batch_size or 16, 1, 32, seed).batches[0]
    with gradflow.trace(m, units="stages.*.*", split=False) as tr:
        logits = m(x.to(device))
        torch.nn.functional.cross_entropy(logits, y.to(device) % logits.shape[1]).backward()
    u = tr.units[~tr.units["is_top"].astype(bool)].sort_values("unit")
    first = u[u["stage"] == u["stage"].min()]     # later stages change width and size: norms not comparable
    sq = tr.samples.assign(sq=tr.samples["grad_norm"] ** 2).groupby("unit")["sq"].sum()
    ratios = np.sqrt(sq.loc[first["unit"]].to_numpy(float))   # whole-batch ||dE/dx_l||, Yang et al.'s quantity
    rows = [_row(net, seed, "yang2019", int(first["stage"].iloc[0]), plain_bn_relu_growth(2) ** (len(ratios) - 1),
                 float(ratios[0] / ratios[-1]))]
    why = "no residual units (the probe needs them)"
    rows += [_row(net, seed, k, why=why) for k in ("eq5", "meanfield", "exponent", "variance", "isotropy")]
    return rows


def held_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Prediction x network: 'held k/n (range of prediction / measured)', or 'n/a [i]'; and the reasons i."""
    cells, reasons = {}, []
    for (key, net), g in rows.groupby(["prediction", "network"], sort=False):
        judged = g[g["held"].notna()]
        if key == "eq5" and judged.empty and g["not_applied"].iloc[0].startswith("exact"):
            cells[(key, net)] = g["not_applied"].iloc[0].replace("exact by construction at", "exact at") + \
                " (by construction)"
            continue
        if judged.empty:
            why = g["not_applied"].iloc[0] or "not measured"
            reasons += [why] if why not in reasons else []
            cells[(key, net)] = f"n/a [{reasons.index(why) + 1}]"
            continue
        k, n = int(judged["held"].astype(bool).sum()), len(judged)
        if key == "exponent":
            span = f"exponent {judged['measured'].min():+.2f}..{judged['measured'].max():+.2f}"
        elif key == "variance":
            span = f"R^2 {judged['measured'].min():.3f}..{judged['measured'].max():.3f}"
        else:
            span = f"x{judged['ratio'].min():.2g}..{judged['ratio'].max():.2g}"
        cells[(key, net)] = f"held {k}/{n} ({span})"
    nets = list(dict.fromkeys(rows["network"]))
    table = pd.DataFrame([[cells.get((k, n), "-") for n in nets] for k in PREDICTIONS], columns=nets)
    table.insert(0, "paper", [p[1] for p in PREDICTIONS.values()])
    table.insert(0, "prediction", [p[0] for p in PREDICTIONS.values()])
    return table, reasons


def to_markdown(table: pd.DataFrame, reasons: Sequence[str], seeds: Sequence[int], command: str) -> str:
    """The condensed table as Markdown, with the reasons a prediction does not apply and how to read it."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in table.itertuples(index=False)]
    lines += ["", "Not applied: " + "; ".join(f"[{i + 1}] {r}" for i, r in enumerate(reasons)) + "."] if reasons else []
    return "\n".join(lines) + (
        f"\n\nAt initialisation, {len(seeds)} seeds, one synthetic batch each. 'held k/n' counts the stages x "
        "seeds where prediction / measured lies within x1.5 (the exponent: where its 95% bootstrap interval "
        "holds -1/2; De & Smith: where a line fits Var(x_l) with R^2 >= 0.95 and better than an exponential); "
        "the range is prediction / measured over them. The total's predictions are compared with the ratio "
        "of batch medians (mean field) and of RMS norms (isotropy) over each stage. "
        f"`{command}`\n")
