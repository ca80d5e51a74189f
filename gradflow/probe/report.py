"""The probe's report: the finding first, then per-stage numbers and verdicts, as a dict and as text.

Everything here is a function of the tables and summary the probe recorded.

What the report says, in this order:

1. The finding: how much the total gradient ||dE/dx_l|| changes from x_L to the
   input, how much the direct term changes, and the share of ||dE/dx_l|| the
   direct term carries at each stage's first and last unit. At initialisation,
   BN nets show the total growing by orders of magnitude toward the input while
   the direct term stays put (PAPER.md section 8).
2. What holds by construction, said once and never spent as a verdict: with
   identity shortcuts the prediction *is* the identity-path reference chain, so
   "direct == prediction" cannot fail.
3. Verdicts only on what can come out either way: that the direct term stays
   constant within a stage (eq. 5, false when an activation f sits after the
   addition), lambda products (eq. 8), gates (mean-field), what the projection
   shortcuts do to the direct term, the total's fitted rate, cancellation.

Stages are the network's stages; a stage's growth is measured from its first
unit that reads the stage's own shape (the projection unit that brings the
shape is reported on its own line).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from gradflow.utils.io import json_safe
from gradflow.theory import per_unit, shape_groups

MATCH_TOL = 1e-3     # |direct / prediction - 1| below this at every unit counts as "follows"
LEVEL = 0.005        # |log change per unit| below this counts as "level"
STAY_TOL = 1e-3      # |log change| of the direct term within a stage below this counts as "stays put"


# --- per-unit facts ----------------------------------------------------------------------

def _units(units: pd.DataFrame) -> pd.DataFrame:
    """per_unit() plus ``next_shape`` (the shape the unit writes), ``reshapes`` and ``share``."""
    df = per_unit(units).sort_values("unit").reset_index(drop=True)
    top = units[units["is_top"].astype(bool)] if "is_top" in units else units.iloc[0:0]
    out_shape = str(top["x_shape"].iloc[0]) if len(top) and "x_shape" in top else None
    shapes = df["x_shape"].astype(str).tolist() if "x_shape" in df else [None] * len(df)
    df["next_shape"] = shapes[1:] + [out_shape if out_shape is not None else shapes[-1] if shapes else None]
    df["reshapes"] = [a is not None and b is not None and a != b for a, b in zip(shapes, df["next_shape"])]
    if "direct_share" in df:
        df["share"] = df["direct_share"]
    elif "direct_ratio" in df and "grad_ratio" in df:
        df["share"] = df["direct_ratio"] / df["grad_ratio"]
    return df


def _has_split(df: pd.DataFrame) -> bool:
    return "direct_ratio" in df and bool(df["direct_ratio"].notna().any())


def _identity_only(df: pd.DataFrame) -> bool:
    """Every unit's shortcut coefficient is the closed-form 1 (identity shortcuts, projections aside)."""
    return "scalar_coef" in df and bool((df["scalar_coef"].astype(float) == 1.0).all())


def _within_stage_change(df: pd.DataFrame) -> float:
    """Largest |log| change of the direct term between consecutive units that read the same shape."""
    if not _has_split(df):
        return float("nan")
    worst = 0.0
    for _, g in df.groupby(shape_groups(df), sort=False):
        d = g.sort_values("unit")["direct_ratio"].to_numpy(float)
        d = d[np.isfinite(d)]
        if len(d) > 1 and (d > 0).all():
            worst = max(worst, float(np.abs(np.diff(np.log(d))).max()))
        elif len(d) > 1 and (d > 0).any():
            return float("inf")
    return worst


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    if "pred_direct_ratio" not in df:
        return df.iloc[0:0]
    # the tracer carries the direct term with a log scale: any non-zero prediction is comparable
    return df[np.isfinite(df["pred_direct_ratio"]) & (df["pred_direct_ratio"] > 0)]


def _end(row: pd.Series) -> dict:
    keys = ("unit", "grad_ratio", "direct_ratio", "pred_direct_ratio", "cancel_frac", "share")
    return {k: _num(row.get(k)) for k in keys} | {"name": row["name"], "unit": int(row["unit"])}


# --- what applies ------------------------------------------------------------------------

def equation(summary: dict, units: pd.DataFrame) -> str:
    """Which prediction applies: eq. (5), eq. (8), eq. (8) with measured gates, or none, in words."""
    df = _units(units)
    if not _has_split(df):
        return "none: no direct/residual split for these units"
    basis = set(df.get("pred_basis", pd.Series(dtype=object)).dropna())
    if _identity_only(df):
        if _within_stage_change(df) <= STAY_TOL:
            return "eq. (5)"
        return ("none: eq. (5) needs f = identity, and an activation after the addition changes the "
                "direct term")
    if basis == {"closed form"}:
        return "eq. (8)"
    if basis and basis <= {"closed form", "mean-field product"}:
        return "eq. (8) with the batch-mean gate coefficients (approximate: gates act element-wise)"
    return "no closed form"


def by_construction(units: pd.DataFrame) -> Optional[str]:
    """The one sentence on what holds by construction here (None where nothing does)."""
    df = _units(units)
    if _has_split(df) and _identity_only(df) and "pred_direct_ratio" in df:
        return ("with identity shortcuts the prediction is the identity-path reference itself (dE/dx_L "
                "carried back through the shortcuts, projections and after-addition activations), so "
                "direct == prediction at every unit: exact by construction, not a finding")
    return None


# --- stages ------------------------------------------------------------------------------

def stage_rows(units: pd.DataFrame) -> list[dict]:
    """Per stage: its own units (projection aside), growth of the total, the direct term's share, verdict."""
    df = _units(units)
    split = _has_split(df)
    rows = []
    for stage, g in df.groupby("stage", sort=True):
        g = g.sort_values("unit")
        own = g[~g["reshapes"]] if (~g["reshapes"]).any() else g
        first, last = g.iloc[0], g.iloc[-1]
        a, b = own.iloc[0], own.iloc[-1]
        row = dict(stage=int(stage), units=[int(first["unit"]), int(last["unit"])],
                   own_units=[int(a["unit"]), int(b["unit"])], x_shape=str(a.get("x_shape", "")),
                   first=_end(first), last=_end(last), start=_end(a), end=_end(b),
                   growth=_ratio(a.get("grad_ratio"), b.get("grad_ratio")) if len(own) > 1 else None,
                   direct_change=(_ratio(a.get("direct_ratio"), b.get("direct_ratio"))
                                  if split and len(own) > 1 else None),
                   projections=[_projection(df, r) for _, r in g[g["reshapes"]].iterrows()],
                   cancel_frac_max=_num(g["cancel_frac"].max()) if split and "cancel_frac" in g else None)
        row["verdict"] = _stage_verdict(g, own, row, split)
        rows.append(row)
    return rows


def _projection(df: pd.DataFrame, r: pd.Series) -> dict:
    nxt = df[df["unit"] > r["unit"]]
    after = nxt.iloc[0] if len(nxt) else None
    return dict(unit=int(r["unit"]), name=r["name"], from_shape=str(r["x_shape"]), to_shape=str(r["next_shape"]),
                direct_change=(_ratio(r.get("direct_ratio"), after.get("direct_ratio"))
                               if after is not None else None))


def _stage_verdict(g: pd.DataFrame, own: pd.DataFrame, row: dict, split: bool) -> str:
    parts = []
    a, b = row["start"], row["end"]
    r = row["growth"]
    if r is None:
        parts.append(f"one unit reads this shape (unit {a['unit']}): no growth to measure within the stage")
    elif r > 1.5:
        parts.append(f"the total grows x{r:.3g} toward the stage's input (units {a['unit']}..{b['unit']})")
    elif r < 1 / 1.5:
        parts.append(f"the total shrinks to x{r:.3g} toward the stage's input (units {a['unit']}..{b['unit']})")
    else:
        parts.append(f"the total stays level across the stage (x{r:.3g})")
    if not split:
        parts.append("no direct/residual split here")
        return "; ".join(parts)
    if a.get("share") is not None:
        parts.append(f"the direct term carries {_pct(a['share'])} of ||dE/dx_l|| at unit {a['unit']}"
                     + (f" and {_pct(b['share'])} at unit {b['unit']}" if b["unit"] != a["unit"] else ""))
    dc = row["direct_change"]
    ident = _identity_only(g)
    if ident and dc is not None and dc > 0 and abs(math.log(dc)) > STAY_TOL:
        parts.append(f"the activation after the addition changes the direct term x{dc:.3g} across the stage")
    elif ident and dc == 0:
        parts.append("the activation after the addition zeroes the direct term within the stage")
    comp = _comparable(own)
    if not ident and "direct_vs_pred" in comp and comp["direct_vs_pred"].notna().any():
        err = float((comp["direct_vs_pred"] - 1).abs().max())
        meanfield = "pred_basis" in comp and (comp["pred_basis"] == "mean-field product").any()
        if meanfield:
            parts.append(f"the direct term is within {err:.0%} of its mean-field gate prediction")
        elif err <= MATCH_TOL:
            parts.append(f"the direct term follows the lambda product (largest deviation {err:.1e})")
        else:
            parts.append(f"the direct term is off its lambda-product prediction by up to {err:.2%}")
    c = row["cancel_frac_max"]
    if c is not None and math.isfinite(c) and c > 0:
        parts.append(f"the residual term cancels the direct one in up to {c:.0%} of samples")
    return "; ".join(parts)


# --- the finding -------------------------------------------------------------------------

def finding(units: pd.DataFrame, stages: Optional[list[dict]] = None, at_init: bool = True) -> dict:
    """The headline: the total's and the direct term's change toward the input, and the direct share per stage.

    Returns:
        ``total_change`` (||dE/dx_0|| / ||dE/dx_L||), ``direct_change`` (the
        same for the direct term), ``direct_stays`` (constant within every
        stage), ``shares`` (per stage: first and last own unit) and ``text``.
    """
    df = _units(units)
    stages = stage_rows(units) if stages is None else stages
    when = "(at initialisation) " if at_init else ""
    if df.empty:
        return dict(text="no units recorded", total_change=None, direct_change=None, shares=[])
    t = _num(df["grad_ratio"].iloc[0]) if "grad_ratio" in df else None
    out: dict = dict(total_change=t, direct_change=None, direct_stays=None, shares=[])
    total_txt = ("the total gradient is not recorded (no backward pass)" if t is None or not math.isfinite(t)
                 else f"the total gradient ||dE/dx_l|| {_grows(t)} from x_L to the first unit")
    if not _has_split(df):
        out["text"] = (f"{when}{total_txt}; the direct term is not measured: these units have no "
                       "direct/residual split (no parts known), so only the total is reported")
        return out
    d = _num(df["direct_ratio"].iloc[0])
    stays = _within_stage_change(df) <= STAY_TOL
    nproj = int(df["reshapes"].sum())
    out.update(direct_change=d, direct_stays=stays)
    if stays:
        direct_txt = (f"the direct term stays put within every stage (x{d:.3g} at the first unit, changed "
                      f"only by the {nproj} projection shortcut{'s' * (nproj != 1)})" if nproj else
                      f"the direct term stays put (x{d:.3g})")
    else:
        direct_txt = f"the direct term {_grows(d)}"
    if stays is False and d is not None and math.isfinite(d) and _identity_only(df):
        direct_txt += " (an activation after the addition sits on its path)"
    shares = [dict(stage=s["stage"], units=[s["start"]["unit"], s["end"]["unit"]],
                   first=s["start"].get("share"), last=s["end"].get("share")) for s in stages]
    out["shares"] = shares
    share_txt = "; ".join(f"stage {s['stage']} {_pct(s['first'])} -> {_pct(s['last'])}" for s in shares)
    out["text"] = (f"{when}{total_txt}, while {direct_txt}. The direct term's share of ||dE/dx_l||, "
                   f"per stage (first -> last unit): {share_txt}")
    return out


def _grows(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "is not recorded"
    if x > 1.5:
        return f"grows x{x:.3g}"
    if x < 1 / 1.5:
        return f"shrinks to x{x:.3g}" if x > 0 else "is zero below the top"
    return f"stays level (x{x:.3g})"


# --- network-level verdicts --------------------------------------------------------------

def verdicts(summary: dict, units: pd.DataFrame) -> dict[str, str]:
    """Network-level verdicts, in plain words, on what can come out either way."""
    out: dict[str, str] = {}
    eq = equation(summary, units)
    df = _units(units)
    split = _has_split(df)
    if not split:
        out["direct"] = ("the direct/residual split is not available for these units (no parts known): "
                         "only the total gradient is reported")
    elif _identity_only(df):
        worst = _within_stage_change(df)
        if worst <= STAY_TOL:
            out["direct"] = (f"eq. (5) applies, not a finding: no activation after the addition sits on the "
                             f"shortcut path, so within every stage the direct term is exactly dE/dx_L carried "
                             f"through the projections, as said above (largest change between "
                             f"consecutive units: {_x(worst)}); the findings are the total and the projections")
        else:
            out["direct"] = (f"eq. (5) does not hold here: an activation after the addition (f) sits on the "
                             f"shortcut path and changes the direct term by up to {_x(worst)} between "
                             f"consecutive units of a stage (eq. 5 needs f = identity)")
    elif eq == "no closed form":
        out["direct"] = ("the shortcuts (1x1 conv or dropout) carry their factor inside h: eq. (8) has no "
                         "closed form here, so the direct term is measured but not predicted")
    else:
        comp = _comparable(df)
        ratio = comp["direct_vs_pred"].dropna() if "direct_vs_pred" in comp else pd.Series(dtype=float)
        under = len(df) - len(comp)
        tail = f" ({under} units whose prediction is 0 are left out)" if under else ""
        if len(ratio) == 0:
            dz = df["direct_ratio"].fillna(0).abs().max()
            out["direct"] = (f"direct term follows {eq}: zero below the top, as the product of zero "
                             "coefficients predicts (a plain net)" if dz < 1e-12 else
                             f"direct term: no unit where {eq} can be compared{tail}")
        else:
            err = float((ratio - 1).abs().max())
            if "approximate" in eq:  # gates act element-wise: the mean coefficients only approximate
                out["direct"] = (f"direct term approximately follows {eq}: ratio to prediction "
                                 f"{ratio.min():.4g}..{ratio.max():.4g} (the gates act element-wise, the "
                                 f"prediction uses their batch means){tail}")
            elif err <= MATCH_TOL:
                out["direct"] = (f"direct term follows {eq}: ratio to prediction {ratio.median():.3f} at every "
                                 f"unit (largest deviation {err:.1e}){tail}")
            else:
                out["direct"] = (f"direct term departs from {eq}: ratio to prediction between "
                                 f"{ratio.min():.3g} and {ratio.max():.3g}{tail}; please report this")
    proj = [(r["unit"], _ratio(r.get("direct_ratio"), _next(df, r["unit"], "direct_ratio")))
            for _, r in df[df["reshapes"]].iterrows()] if split else []
    proj = [(u, c) for u, c in proj if c is not None]
    if proj:
        out["projections"] = ("the projection shortcuts change the direct term by "
                              + ", ".join(f"x{c:.3g} (unit {u})" for u, c in proj)
                              + " toward the input: eq. (5) and (8) do not cover them")
    direct = summary.get("direct_rate") or {}
    want = summary.get("predicted_direct_rate_with_f", summary.get("predicted_direct_rate"))
    if split and not _identity_only(df) and direct and math.isfinite(direct.get("slope", float("nan"))):
        pred_txt = (f"predicted {want:+.4f}" if isinstance(want, float) and math.isfinite(want)
                    else "no closed-form rate")
        match = summary.get("direct_matches_prediction")
        judge = {True: "as predicted", False: "not the predicted rate", None: "measured only"}[match]
        out["direct_rate"] = (f"direct term changes by {direct['slope']:+.4f} log per unit toward the input "
                              f"({pred_txt}): {judge}")
    total = summary.get("total_rate") or {}
    s = total.get("slope", float("nan"))
    if s is not None and math.isfinite(s):
        lo, hi = total.get("ci_low", s), total.get("ci_high", s)
        fit = f"{s:+.4f} log per unit within stages, 95% CI {lo:+.4f}..{hi:+.4f}"
        if abs(s) < LEVEL:
            out["total"] = f"total gradient stays level across depth ({fit})"
        elif s > 0:
            out["total"] = (f"total gradient grows toward the input, x{math.exp(s):.4g} per unit ({fit})"
                            + (": the residual paths amplify it" if split else ""))
        else:
            out["total"] = f"total gradient shrinks toward the input, x{math.exp(s):.4g} per unit ({fit})"
        if split and eq.startswith("eq."):
            out["total"] += f"; the prediction ({eq}) is about the direct term, not this total"
    c = summary.get("cancel_frac_max")
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
    stages = stage_rows(v.units)
    return json_safe(dict(label=v.label, model=v.model, options=v.options, source=v.source,
                      n_units=int(v.summary.get("n_units", 0)), equation=equation(v.summary, v.units),
                      finding=finding(v.units, stages, at_init=v.source != "checkpoint"),
                      by_construction=by_construction(v.units), stages=stages,
                      verdicts=verdicts(v.summary, v.units), summary=v.summary, timings=v.timings,
                      checkpoint=v.checkpoint_info))


def report_dict(result, files: dict | None = None) -> dict:
    """The whole probe as one JSON-safe dict (what --json prints and summary.json holds)."""
    return json_safe(dict(inputs=result.inputs, config=result.config,
                      variants=[variant_report(v) for v in result.variants.values()],
                      files=files or {}))


def format_report(report: dict) -> str:
    """The text report: the finding first, then a block per network (or one line per network when comparing)."""
    cfg = report["config"]
    head = [f"input: {report['inputs']}",
            f"mode {cfg['mode']}, device {cfg['device']}, seed {cfg['seed']}, "
            f"batch {cfg['batch_size']} x {cfg['batches']}, "
            + (f"sequence {cfg['seq_len']} tokens" if cfg.get("seq_len") else f"image {cfg['image_size']}px")]
    vs = report["variants"]
    body = _compare_lines(vs) if len(vs) > 1 else _single_lines(vs[0])
    files = report.get("files") or {}
    tail = [f"wrote {', '.join(files.values())}"] if files else []
    lead, rest = body
    return "\n".join(lead + [""] + head + [""] + rest + ([""] + tail if tail else []))


def _single_lines(v: dict) -> tuple[list[str], list[str]]:
    opts = ", ".join(f"{k}={x}" for k, x in v["options"].items())
    lead = [f"{v['model']}{f' ({opts})' if opts else ''}: {v['n_units']} residual units",
            f"finding: {v['finding']['text']}"]
    if v.get("by_construction"):
        lead.append(f"by construction: {v['by_construction']}")
    lines = [f"prediction for the direct term: {v['equation']}",
             "ratios are ||dE/dx_l|| / ||dE/dx_L|| (batch means of per-sample ratios); share: "
             "||direct|| / ||dE/dx_l||",
             f"{'stage':<6}{'units':<10}{'x shape':<11}{'total first->last':<22}{'growth':>9}  "
             f"{'direct first->last':<22}{'share first->last':<22}{'cancel':>7}"]
    for r in v["stages"]:
        a, b = r["start"], r["end"]
        span = f"{r['own_units'][0]}-{r['own_units'][1]}"
        growth = "-" if r["growth"] is None else f"x{r['growth']:.3g}"
        lines.append(f"{r['stage']:<6}{span:<10}{r['x_shape']:<11}"
                     f"{_g(a['grad_ratio']) + ' -> ' + _g(b['grad_ratio']):<22}{growth:>9}  "
                     f"{_g(a['direct_ratio']) + ' -> ' + _g(b['direct_ratio']):<22}"
                     f"{_pct(a.get('share')) + ' -> ' + _pct(b.get('share')):<22}{_pct(r['cancel_frac_max']):>7}")
        for p in r["projections"]:
            dc = "" if p["direct_change"] is None else f", direct term x{p['direct_change']:.3g} across it"
            lines.append(f"      unit {p['unit']} projects {p['from_shape']} -> {p['to_shape']}{dc}")
        lines.append(f"      {r['verdict']}")
    lines.append("network (fitted change of log ratio per unit toward the input):")
    lines += [f"  {k:<12}{t}" for k, t in v["verdicts"].items()]
    return lead, lines


def _compare_lines(vs: list[dict]) -> tuple[list[str], list[str]]:
    w = max(12, max(len(v["label"]) for v in vs) + 2)
    lines = ["finding, per network: the total gradient and the direct term at the first unit (x_L = 1), "
             "the direct term's share of ||dE/dx_l|| there, and the fitted rates",
             f"{'network':<{w}}{'total@0':>10}{'direct@0':>10}{'share@0':>10}{'total/unit':>11}"
             f"{'direct/unit':>12}{'pred/unit':>10}{'cancel':>8}  verdict"]
    for v in vs:
        s = v["summary"] or {}
        u0 = v["stages"][0]["first"] if v["stages"] else {}
        tot = (s.get("total_rate") or {}).get("slope")
        dr = (s.get("direct_rate") or {}).get("slope")
        pr = s.get("predicted_direct_rate_with_f", s.get("predicted_direct_rate"))
        verdict = v["verdicts"].get("direct", "").split(":")[0]
        lines.append(f"{v['label']:<{w}}{_g(u0.get('grad_ratio')):>10}{_g(u0.get('direct_ratio')):>10}"
                     f"{_pct(u0.get('share')):>10}{_r(tot):>11}{_r(dr):>12}{_r(pr):>10}"
                     f"{_pct(s.get('cancel_frac_max')):>8}  {verdict}")
    notes = ["@0: at the first unit (input side); /unit: fitted change of log ratio per unit toward the input"]
    if any(v.get("by_construction") for v in vs):
        notes.append("by construction: with identity shortcuts direct == prediction at every unit (the "
                     "prediction is the identity-path reference itself): not a finding")
    return lines, notes


# --- formatting --------------------------------------------------------------------------

def _ratio(a: Any, b: Any) -> Optional[float]:
    a, b = _num(a), _num(b)
    if not isinstance(a, float) or not isinstance(b, float) or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b if b > 0 else None


def _x(logchange: float) -> str:
    if not math.isfinite(logchange):
        return "a drop to zero"
    return "none" if logchange == 0 else f"x{math.exp(logchange):.4g}"


def _g(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _r(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"


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
