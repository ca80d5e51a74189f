"""The probe's report: the finding first, then per-stage numbers, fits and predictions, as a dict and as text.

Everything here is a function of the tables and analysis the probe recorded
(docs/theory.md says what each number is). What the report says, in order:

1. The finding: how much the total gradient changes from x_L to the input (the
   ratio of batch medians, the mean of per-sample ratios beside it), how much
   the direct term changes, and the direct term's share per stage.
2. What holds by construction, once: the direct term obeys eq. (5)/(8)
   wherever they cover a unit (docs/theory.md, section 2), which checks the
   split; where they cover no unit, why not.
3. Samples whose ||dE/dx_L|| is degenerate (a saturated softmax), named.
4. Per stage: the endpoints, the shape of the profile (exponential, power law
   in Var(x_l), or neither) with bootstrap intervals (section 4), and the
   predictions of the total that can fail (mean field, isotropy; section 3)
   with their deviation from the measurement.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from gradflow.theory import per_unit
from gradflow.theory.predict import COVERED
from gradflow.theory.profile import FIT_R2
from gradflow.theory.total import with_predictions
from gradflow.utils.io import json_safe

ISO_TOL = math.log(1.5)   # |log(prediction / measured)| above this: the prediction fails there
GROW = 1.5                # a change beyond x1.5 either way is growth or shrinkage, else "level"


# --- per-unit facts ----------------------------------------------------------------------

def _units(units: pd.DataFrame) -> pd.DataFrame:
    """per_unit() of the joined table plus ``next_shape``, ``reshapes``, ``share`` and ``total`` (median ratio)."""
    df = per_unit(with_predictions(units)).sort_values("unit").reset_index(drop=True)
    top = units[units["is_top"].astype(bool)] if "is_top" in units else units.iloc[0:0]
    out_shape = str(top["x_shape"].iloc[0]) if len(top) and "x_shape" in top else None
    shapes = df["x_shape"].astype(str).tolist() if "x_shape" in df else [None] * len(df)
    df["next_shape"] = shapes[1:] + [out_shape if out_shape is not None else shapes[-1] if shapes else None]
    df["reshapes"] = [a is not None and b is not None and a != b for a, b in zip(shapes, df["next_shape"])]
    if "direct_share" in df:
        df["share"] = df["direct_share"]
    elif "direct_ratio" in df and "grad_ratio" in df:
        df["share"] = df["direct_ratio"] / df["grad_ratio"]
    df["total"] = df["grad_ratio_med"] if "grad_ratio_med" in df else df.get("grad_ratio")
    df["direct"] = df["direct_ratio_med"] if "direct_ratio_med" in df else df.get("direct_ratio")
    return df


def _has_split(df: pd.DataFrame) -> bool:
    return "direct_ratio" in df and bool(df["direct_ratio"].notna().any())


def _end(row: pd.Series) -> dict:
    keys = ("grad_ratio", "total", "direct", "share", "gsc", "iso_ratio", "grad_ratio_rms", "cancel_frac")
    return {k: _num(row.get(k)) for k in keys} | {"name": row["name"], "unit": int(row["unit"])}


# --- eq. (5)/(8): coverage, said once -------------------------------------------------------

def coverage_summary(units: pd.DataFrame) -> dict:
    """How many units eq. (5)/(8) cover, and why the others are not covered (reason -> count)."""
    df = _units(units)
    basis = df["pred_basis"] if "pred_basis" in df else pd.Series(dtype=object)
    covered = basis.isin(COVERED)
    return dict(covered=int(covered.sum()), units=int(len(df)),
                equations=sorted(set(basis[covered])),
                not_covered={k: int(v) for k, v in basis[~covered].value_counts().items()})


def equation(summary: dict, units: pd.DataFrame) -> str:
    """Which of eq. (5)/(8) cover these units, in words (``none: <why>`` where neither does)."""
    df = _units(units)
    if not _has_split(df):
        return "none: no direct/residual split for these units"
    c = coverage_summary(units)
    if not c["covered"]:
        why = max(c["not_covered"], key=c["not_covered"].get) if c["not_covered"] else "no units"
        return "none: " + why.removeprefix("not covered: ")
    eqs = " and ".join(c["equations"])
    return eqs if c["covered"] == c["units"] else f"{eqs} at {c['covered']} of {c['units']} units"


def by_construction(units: pd.DataFrame) -> Optional[str]:
    """The one sentence on what holds by construction (None without a split or covered unit)."""
    df = _units(units)
    if not _has_split(df):
        return None
    c = coverage_summary(units)
    if not c["covered"]:
        return None
    err = df.loc[df["pred_basis"].isin(COVERED), "direct_vs_pred"] if "direct_vs_pred" in df else pd.Series([])
    err = float((err.dropna() - 1).abs().max()) if err.notna().any() else float("nan")
    rest = "; ".join(f"{n} unit{'s' * (n != 1)} {why.removeprefix('not covered: ')}"
                     for why, n in c["not_covered"].items())
    return (f"the direct term obeys {' and '.join(c['equations'])} at the {c['covered']} of {c['units']} units "
            f"they cover (largest deviation {err:.1e}): that checks the direct/residual split, it is not a "
            "finding" + (f"; not covered: {rest}" if rest else ""))


# --- stages ------------------------------------------------------------------------------

def stage_rows(units: pd.DataFrame, fits: Optional[list] = None) -> list[dict]:
    """Per stage: endpoints (median ratios), the shape fit, the predictions of the total and a verdict."""
    df = _units(units)
    split = _has_split(df)
    fits = {tuple(f["units"]): f for f in (fits or [])}
    rows = []
    for stage, g in df.groupby("stage", sort=True):
        g = g.sort_values("unit")
        own = g[~g["reshapes"]] if (~g["reshapes"]).any() else g
        a, b = own.iloc[0], own.iloc[-1]
        fit = next((f for k, f in fits.items() if k[0] <= int(a["unit"]) <= k[1]), None)
        growth = _ratio(a["total"], b["total"]) if len(own) > 1 else None
        mf = _ratio(a.get("mf_factor"), b.get("mf_factor")) if len(own) > 1 else None
        if mf is not None and own["mf_basis"].ne("mean field").any():
            mf = None
        iso = _ratio(a.get("iso_ratio"), b.get("iso_ratio")) if len(own) > 1 else None
        rms = _ratio(a.get("grad_ratio_rms"), b.get("grad_ratio_rms")) if len(own) > 1 else None
        row = dict(stage=int(stage), units=[int(g.iloc[0]["unit"]), int(g.iloc[-1]["unit"])],
                   own_units=[int(a["unit"]), int(b["unit"])], x_shape=str(a.get("x_shape", "")),
                   first=_end(g.iloc[0]), last=_end(g.iloc[-1]), start=_end(a), end=_end(b), growth=growth,
                   growth_rms=rms, meanfield=mf, isotropy=iso, fit=fit,
                   direct_change=_ratio(a.get("direct"), b.get("direct")) if split and len(own) > 1 else None,
                   projections=[_projection(df, r) for _, r in g[g["reshapes"]].iterrows()],
                   cancel_frac_max=_num(g["cancel_frac"].max()) if split and "cancel_frac" in g else None)
        row["verdict"] = _stage_verdict(row, split)
        rows.append(row)
    return rows


def _projection(df: pd.DataFrame, r: pd.Series) -> dict:
    nxt = df[df["unit"] > r["unit"]]
    after = nxt.iloc[0] if len(nxt) else None
    return dict(unit=int(r["unit"]), name=r["name"], from_shape=str(r["x_shape"]), to_shape=str(r["next_shape"]),
                direct_change=(_ratio(r.get("direct"), after.get("direct")) if after is not None else None))


def _stage_verdict(row: dict, split: bool) -> str:
    a, b, r = row["start"], row["end"], row["growth"]
    if r is None:
        return f"one unit reads this shape (unit {a['unit']}): no growth to measure within the stage"
    parts = [f"the total {_grows(r)} toward the stage's input (units {a['unit']}..{b['unit']})"]
    fit = row["fit"]
    if fit:
        parts.append(_fit_words(fit, row["meanfield"] is not None))
    if row["meanfield"] is not None:
        parts.append(f"mean field predicts x{row['meanfield']:.3g} ({_dev(row['meanfield'], r)})")
    if row["isotropy"] is not None and row["growth_rms"] is not None:
        parts.append(f"isotropy predicts x{row['isotropy']:.3g} against x{row['growth_rms']:.3g} for the RMS "
                     f"norms ({_dev(row['isotropy'], row['growth_rms'])})")
    if not split:
        parts.append("no direct/residual split here")
        return "; ".join(parts)
    if a.get("share") is not None:
        parts.append(f"the direct term carries {_pct(a['share'])} of ||dE/dx_l|| at unit {a['unit']}"
                     + (f" and {_pct(b['share'])} at unit {b['unit']}" if b["unit"] != a["unit"] else ""))
    dc = row["direct_change"]
    if dc is not None and dc > 0 and abs(math.log(dc)) > 1e-3:
        parts.append(f"the direct term changes x{dc:.3g} across the stage")
    elif dc == 0:
        parts.append("the direct term is zero below the stage's top")
    c = row["cancel_frac_max"]
    if c is not None and math.isfinite(c) and c > 0:
        parts.append(f"the residual term cancels the direct one in up to {c:.0%} of samples")
    return "; ".join(parts)


def _fit_words(fit: dict, meanfield: bool = False) -> str:
    best = fit.get("better")
    span = f" over units {fit['units'][0]}..{fit['units'][1]}" if fit.get("units") else ""   # every input of this shape
    if best is None:
        return f"shape{span}: {fit['why']}"
    f = fit[best]
    ok = math.isfinite(f.get("ci_low", float("nan")))
    if best == "exponential":
        ci = (f" (95% CI x{math.exp(f['ci_low']):.4g}..x{math.exp(f['ci_high']):.4g}, bootstrap over samples)"
              if ok else "")
    else:
        ci = f" (95% CI {f['ci_low']:+.3g}..{f['ci_high']:+.3g}, bootstrap over samples)" if ok else ""
    what = (f"x{math.exp(f['slope']):.4g} per unit toward the input{ci}" if best == "exponential" else
            f"exponent {f['slope']:+.3g} of Var(x_l){ci}" + (", against mean field's -0.5" if meanfield else ""))
    return f"{span.strip() + ' it ' if span else ''}fits {'an' if best == 'exponential' else 'a'} {best} ({fit['why']}): {what}"


def _dev(pred: float, meas: float) -> str:
    if not (pred and meas) or pred <= 0 or meas <= 0:
        return "no comparison"
    q = pred / meas
    held = abs(math.log(q)) <= ISO_TOL
    return f"{'holds' if held else 'fails'}: prediction / measured {q:.3g}"


# --- the finding -------------------------------------------------------------------------

def finding(units: pd.DataFrame, stages: Optional[list[dict]] = None, at_init: bool = True) -> dict:
    """The headline: the total's and the direct term's change toward the input, and the direct share per stage.

    Returns:
        ``total_change`` (ratio of batch medians at the first unit), ``total_mean``
        (the mean of per-sample ratios there), ``direct_change``, ``shares`` and ``text``.
    """
    df = _units(units)
    stages = stage_rows(units) if stages is None else stages
    when = "(at initialisation) " if at_init else ""
    if df.empty:
        return dict(text="no units recorded", total_change=None, total_mean=None, direct_change=None, shares=[])
    t, m = _num(df["total"].iloc[0]), _num(df["grad_ratio"].iloc[0]) if "grad_ratio" in df else None
    out: dict = dict(total_change=t, total_mean=m, direct_change=None, shares=[])
    if t is None or not math.isfinite(t):
        total_txt = "the total gradient is not recorded (no backward pass)"
    else:
        mean = (f"the mean of per-sample ratios is {_g(m)}" if not isinstance(m, float) or math.isfinite(m) else
                "the mean of per-sample ratios is infinite: some sample's ||dE/dx_L|| is exactly 0")
        total_txt = (f"the total gradient ||dE/dx_l|| {_grows(t)} from x_L to the first unit (ratio of batch "
                     f"medians; {mean})")
    if not _has_split(df):
        out["text"] = (f"{when}{total_txt}; the direct term is not measured: these units have no "
                       "direct/residual split (no parts known), so only the total is reported")
        return out
    d = _num(df["direct"].iloc[0])
    out["direct_change"] = d
    shares = [dict(stage=s["stage"], units=[s["start"]["unit"], s["end"]["unit"]],
                   first=s["start"].get("share"), last=s["end"].get("share")) for s in stages]
    out["shares"] = shares
    share_txt = "; ".join(f"stage {s['stage']} {_pct(s['first'])} -> {_pct(s['last'])}" for s in shares)
    within = [s["direct_change"] for s in stages if s.get("direct_change") is not None]
    nproj = int(df["reshapes"].sum())
    if within and all(c > 0 and abs(math.log(c)) <= 1e-3 for c in within) and nproj:
        direct_txt = (f"the direct term {_grows(d)}, all of it at the {nproj} projection shortcut"
                      f"{'s' * (nproj != 1)}")
    else:
        direct_txt = f"the direct term {_grows(d)}"
    out["text"] = (f"{when}{total_txt}, while {direct_txt}. The direct term's share of "
                   f"||dE/dx_l||, per stage (first -> last unit): {share_txt}")
    return out


def _grows(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "is not recorded"
    if x > GROW:
        return f"grows x{x:.3g}"
    if x < 1 / GROW:
        return f"shrinks to x{x:.3g}" if x > 0 else "is zero below the top"
    return f"stays level (x{x:.3g})"


# --- network-level -------------------------------------------------------------------------

def predictions(units: pd.DataFrame) -> list[dict]:
    """The predictions of the total at the first unit, each with its basis and deviation from the measurement."""
    df = _units(units)
    if df.empty:
        return []
    a = df.iloc[0]
    out = []
    iso, rms = _num(a.get("iso_ratio")), _num(a.get("grad_ratio_rms"))
    if isinstance(iso, float) and math.isfinite(iso):
        bad = _first_failure(df)
        out.append(dict(name="isotropy", paper="free independence of the units' Jacobians",
                        predicted=iso, measured=rms, against="ratio of batch RMS norms",
                        deviation=iso / rms if rms else None,
                        fails_from=bad, assumes="the gradient is isotropic for each unit's Jacobian"))
    else:
        out.append(dict(name="isotropy", paper="free independence", predicted=None,
                        note="no unit gain measured (units without callable parts)"))
    mf = df["mf_basis"].eq("mean field") if "mf_basis" in df else pd.Series(False, index=df.index)
    out.append(dict(name="mean field", paper="Yang & Schoenholz 2017; De & Smith 2020",
                    covered=int(mf.sum()), units=int(len(df)),
                    assumes="h a scalar multiple, f the identity, branch gain^2 = Var(F)/Var(x_l); BN's own "
                            "backward factor (Yang et al. 2019) left out",
                    note=None if mf.any() else "covers no unit: "
                    + str(df["mf_basis"].iloc[0]).removeprefix("not covered: ") if "mf_basis" in df else None))
    g = _num(a.get("gsc"))
    out.append(dict(name="gradient scale coefficient", paper="Philipp et al. 2018", measured=g,
                    raw=_num(a.get("total")), note="a measurement: ratio x ||x_l|| / ||x_L||"))
    return out


def _first_failure(df: pd.DataFrame) -> Optional[int]:
    """The unit nearest the output where isotropy's prediction is off the RMS ratio by more than x1.5."""
    if "iso_ratio" not in df or "grad_ratio_rms" not in df:
        return None
    q = np.log(df["iso_ratio"].to_numpy(float) / df["grad_ratio_rms"].to_numpy(float))
    bad = np.flatnonzero(np.abs(q) > ISO_TOL)
    return int(df["unit"].iloc[bad[-1]]) if len(bad) else None


def verdicts(summary: dict, units: pd.DataFrame, analysis: Optional[dict] = None) -> dict[str, str]:
    """Network-level statements, in plain words, each on what can come out either way."""
    out: dict[str, str] = {}
    df = _units(units)
    split = _has_split(df)
    if not split:
        out["direct"] = ("the direct/residual split is not available for these units (no parts known): "
                         "only the total gradient is reported")
    else:
        c = coverage_summary(units)
        out["direct"] = (f"{equation(summary, units)} (exact by construction where covered, not a finding)"
                         if c["covered"] else f"eq. (5)/(8) cover no unit here ({equation(summary, units)})")
        proj = [(int(r["unit"]), _ratio(r.get("direct"), _next(df, r["unit"], "direct")))
                for _, r in df[df["reshapes"]].iterrows()]
        proj = [(u, x) for u, x in proj if x is not None]
        if proj:
            out["projections"] = ("the projection shortcuts change the direct term by "
                                  + ", ".join(f"x{x:.3g} (unit {u})" for u, x in proj)
                                  + " toward the input: eq. (5) and (8) do not cover them")
    t = _num(df["total"].iloc[0]) if len(df) else None
    if t is not None and math.isfinite(t):
        shapes = [_shape_word(r) for r in stage_rows(units, ((analysis or {}).get("fits") or {}).get("total"))
                  if r["growth"] is not None and r.get("fit")]
        out["total"] = (f"the total {_grows(t)} from x_L to the first unit (ratio of batch medians)"
                        + (f"; shape within stages (see above): {'; '.join(shapes)}" if shapes else ""))
    for p in predictions(units):
        if p["name"] == "isotropy" and p.get("predicted") is not None:
            tail = (f"; it is off by more than x1.5 first at unit {p['fails_from']}, counting from the output"
                    if p["fails_from"] is not None else "; it holds within x1.5 at every unit")
            out["isotropy"] = (f"isotropy predicts x{p['predicted']:.3g} at the first unit against "
                               f"x{p['measured']:.3g} measured (RMS norms; prediction / measured "
                               f"{p['deviation']:.3g}){tail}")
        elif p["name"] == "isotropy":
            out["isotropy"] = f"isotropy: {p['note']}"
        elif p["name"] == "mean field":
            out["mean field"] = (f"mean field covers {p['covered']} of {p['units']} units (per stage above)"
                                 if p["covered"] else f"mean field {p['note']}")
        elif p["measured"] is not None and p["raw"] is not None:
            out["gsc"] = (f"gradient scale coefficient at the first unit {p['measured']:.3g} beside the raw "
                          f"ratio {p['raw']:.3g} (the ratio times ||x_l|| / ||x_L||: the growth the forward "
                          "scale does not explain)")
    deg = (analysis or {}).get("degenerate") or []
    n = (analysis or {}).get("batch")
    if deg:
        names = ", ".join(f"{d['sample']}" + (f" (step {d['step']})" if d["step"] else "") for d in deg[:12])
        out["samples"] = (f"{len(deg)} of {n} samples have a degenerate ||dE/dx_L|| (below 1e-3 x the batch "
                          f"median: a saturated softmax): samples {names}; their per-sample ratios reach "
                          f"{max(d['max_ratio'] for d in deg):.3g} and would set the batch mean, so the "
                          "headline is the ratio of batch medians")
    elif n:
        out["samples"] = f"no sample of {n} has a degenerate ||dE/dx_L|| (each at least 1e-3 x the batch median)"
    v = summary.get("variance") if summary else None
    if v:
        r2 = f"R^2 linear {v['linear']['r2']:.3f}, exponential {v['log']['r2']:.3f}"
        best = max(v["linear"]["r2"], v["log"]["r2"])
        spread = (df.groupby("stage")["x_var"].agg(lambda s: s.max() / s.min() if s.min() > 0 else np.inf).max()
                  if "x_var" in df else np.inf)
        if spread < GROW:
            out["variance"] = f"Var(x_l) stays level within every stage (within x{spread:.3g})"
        else:
            out["variance"] = (f"Var(x_l) within stages: {v['better_fit']} fits better ({r2})" if best >= FIT_R2
                               else f"Var(x_l) within stages: neither a line nor an exponential fits ({r2})")
        preact = "f_identity" in df and bool((df["f_identity"] == 1).all())
        if preact and (analysis or {}).get("batchnorm"):
            line = v["better_fit"] == "linear" and v["linear"]["r2"] >= FIT_R2   # the zoo table's rule
            out["variance"] += ("; De & Smith 2020's line for pre-activation BN nets "
                                + ("holds" if line else "does NOT hold"))
        else:
            out["variance"] += ("; De & Smith 2020's linear law is for pre-activation units with BatchNorm, "
                                "which this network does not have: not compared")
    c = summary.get("cancel_frac_max") if summary else None
    if split and c is not None and math.isfinite(c):
        out["cancel"] = ("in no sample does the residual term cancel the direct one (||dE/dx_l|| >= "
                         "0.1 ||direct|| at every unit)" if c == 0 else
                         f"the residual term cancels the direct one in up to {c:.0%} of samples at some unit")
    return out


def _next(df: pd.DataFrame, unit: int, column: str):
    nxt = df[df["unit"] > unit]
    return nxt[column].iloc[0] if len(nxt) and column in nxt else None


# --- the report --------------------------------------------------------------------------

def variant_report(v) -> dict:
    """JSON-safe report of one VariantResult."""
    analysis = getattr(v, "analysis", None) or {}
    fits = (analysis.get("fits") or {}).get("total")
    stages = stage_rows(v.units, fits)
    return json_safe(dict(label=v.label, model=v.model, options=v.options, source=v.source,
                          n_units=int(v.summary.get("n_units", 0)), equation=equation(v.summary, v.units),
                          finding=finding(v.units, stages, at_init=v.source != "checkpoint"),
                          by_construction=by_construction(v.units), stages=stages,
                          coverage=coverage_summary(v.units), predictions=predictions(v.units),
                          verdicts=verdicts(v.summary, v.units, analysis), analysis=analysis,
                          summary=v.summary, timings=v.timings, checkpoint=v.checkpoint_info))


def report_dict(result, files: dict | None = None) -> dict:
    """The whole probe as one JSON-safe dict (what --json prints and summary.json holds)."""
    return json_safe(dict(inputs=result.inputs, config=result.config,
                          variants=[variant_report(v) for v in result.variants.values()],
                          files=files or {}))


def _shape_word(s: dict) -> str:
    fit = s.get("fit")
    if not fit or fit.get("better") is None:
        word = fit["why"].split(":")[0].split(" (")[0] if fit else "-"
        return f"{s['stage']}: " + (word + ", too few" if word.endswith(" units") else word)
    f = fit[fit["better"]]
    return (f"{s['stage']}: exp x{math.exp(f['slope']):.3g}/unit" if fit["better"] == "exponential" else
            f"{s['stage']}: power {f['slope']:+.2f}")


# --- formatting --------------------------------------------------------------------------

def _ratio(a: Any, b: Any) -> Optional[float]:
    a, b = _num(a), _num(b)
    if not isinstance(a, float) or not isinstance(b, float) or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b if b > 0 else None


def _g(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if 100 * x >= 1:
        return f"{100 * x:.3g}%"
    return f"{100 * x:.2g}%" if 100 * x >= 0.01 or x == 0 else f"{100 * x:.1e}%"


def _num(x: Any) -> Any:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return x
