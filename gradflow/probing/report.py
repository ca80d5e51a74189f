"""The probe's report: per-stage numbers and plain-word verdicts, as a dict and as text.

Everything here is a function of the tables and summary the probe recorded.
The prediction of eq. (5)/(8) is about the *direct* term; the total gradient is
reported beside it and judged on its own (PAPER.md section 8): with BN the
residual paths can amplify it, and the report says so instead of calling it a
failed prediction.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

MATCH_TOL = 1e-3     # |direct / prediction - 1| below this at every unit counts as "follows"
LEVEL = 0.005        # |log change per unit| below this counts as "level"


def per_unit(units: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (body only), numeric columns averaged over the recorded steps."""
    body = units[~units["is_top"].astype(bool)]
    num = body.groupby("unit").mean(numeric_only=True)
    meta = body.groupby("unit")[["name", "stage", "x_shape"]].first()
    if "pred_basis" in body:
        meta["pred_basis"] = body.groupby("unit")["pred_basis"].first()
    return meta.join(num.drop(columns=[c for c in ("stage",) if c in num]), how="left").reset_index()


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    if "pred_direct_ratio" not in df:
        return df.iloc[0:0]
    # the tracer carries the direct term with a log scale: any non-zero prediction is comparable
    return df[np.isfinite(df["pred_direct_ratio"]) & (df["pred_direct_ratio"] > 0)]


def _end(row: pd.Series) -> dict:
    return {k: _num(row.get(k)) for k in ("unit", "grad_ratio", "direct_ratio", "pred_direct_ratio",
                                          "cancel_frac")} | {"name": row["name"]}


def stage_rows(units: pd.DataFrame) -> list[dict]:
    """Per stage: first and last unit's grad_ratio, direct_ratio, prediction, cancel share; a verdict."""
    df = per_unit(units)
    rows = []
    for stage, g in df.groupby("stage", sort=True):
        g = g.sort_values("unit")
        first, last = g.iloc[0], g.iloc[-1]
        row = dict(stage=int(stage), units=[int(first["unit"]), int(last["unit"])],
                   x_shape=str(first["x_shape"]), first=_end(first), last=_end(last),
                   cancel_frac_max=_num(g["cancel_frac"].max()) if "cancel_frac" in g else None)
        row["verdict"] = _stage_verdict(g, first, last)
        rows.append(row)
    return rows


def _stage_verdict(g: pd.DataFrame, first: pd.Series, last: pd.Series) -> str:
    parts = []
    a, b = first.get("grad_ratio", np.nan), last.get("grad_ratio", np.nan)
    if np.isfinite(a) and np.isfinite(b) and b > 0 and len(g) > 1:
        r = a / b
        if r > 1.5:
            parts.append(f"the gradient grows x{r:.3g} toward the stage's input")
        elif r < 1 / 1.5:
            parts.append(f"the gradient shrinks to {r:.3g}x toward the stage's input")
        else:
            parts.append(f"the gradient stays level across the stage (x{r:.3g})")
    comp = _comparable(g)
    if "direct_vs_pred" in comp and comp["direct_vs_pred"].notna().any():
        err = float((comp["direct_vs_pred"] - 1).abs().max())
        meanfield = "pred_basis" in comp and (comp["pred_basis"] == "mean-field product").any()
        if err <= MATCH_TOL:
            parts.append("the direct term is as predicted")
        elif meanfield:
            parts.append(f"the direct term is within {err:.0%} of its mean-field gate prediction")
        else:
            parts.append(f"the direct term is off its prediction by up to {err:.2%}")
    elif "direct_ratio" in g and g["direct_ratio"].notna().any():
        parts.append("the direct term has no closed-form prediction here")
    if "cancel_frac" in g and g["cancel_frac"].notna().any():
        c = float(g["cancel_frac"].max())
        parts.append("the residual term never cancels it" if c == 0
                     else f"the residual term cancels the direct one in up to {c:.0%} of samples")
    return "; ".join(parts) or "no gradient recorded"


def equation(summary: dict, units: pd.DataFrame) -> str:
    """Which prediction applies: eq. (5), eq. (8), eq. (8) with measured gates, or none."""
    pred = summary.get("predicted_direct_rate", float("nan"))
    if pred == 0:
        return "eq. (5)"
    if pred == float("-inf") or (isinstance(pred, float) and math.isfinite(pred)):
        return "eq. (8)"
    basis = set(units.get("pred_basis", pd.Series(dtype=object)).dropna()) - {"closed form"}
    if basis == {"mean-field product"}:
        return "eq. (8) with the batch-mean gate coefficients (approximate: gates act element-wise)"
    return "no closed form"


def verdicts(summary: dict, units: pd.DataFrame) -> dict[str, str]:
    """Network-level verdicts in plain words: direct vs prediction, direct rate, total rate, cancellation."""
    out: dict[str, str] = {}
    eq = equation(summary, units)
    df = per_unit(units)
    n = int(summary.get("units", len(df)))
    if "direct_ratio" not in df or df["direct_ratio"].isna().all():
        out["direct"] = ("the direct/residual split is not available for these units (no parts known): "
                         "only the total gradient is reported")
    elif eq == "no closed form":
        out["direct"] = ("the shortcuts (1x1 conv or dropout) carry their factor inside h: eq. (8) has no "
                         "closed form here, so the direct term is measured but not predicted")
    else:
        comp = _comparable(df)
        ratio = comp["direct_vs_pred"].dropna() if "direct_vs_pred" in comp else pd.Series(dtype=float)
        under = len(df) - len(comp)
        tail = (f" ({under} units whose prediction is 0 are left out)" if under else "")
        if len(ratio) == 0:
            dz = df["direct_ratio"].fillna(0).abs().max()
            out["direct"] = (f"direct term follows {eq}: zero below the top, as the product of zero "
                             "coefficients predicts (a plain net)" if dz < 1e-12 else
                             f"direct term: no unit where {eq} can be compared{tail}")
        else:
            err = float((ratio - 1).abs().max())
            if "approximate" in eq:  # gates act element-wise: the mean coefficients only approximate
                out["direct"] = (f"direct term approximately follows {eq}: ratio to prediction "
                                 f"{ratio.min():.3g}..{ratio.max():.3g} (the gates act element-wise, the "
                                 f"prediction uses their batch means){tail}")
            elif err <= MATCH_TOL:
                out["direct"] = (f"direct term follows {eq}: ratio to prediction {ratio.median():.3f} at every "
                                 f"unit (largest deviation {err:.1e}){tail}")
            else:
                out["direct"] = (f"direct term departs from {eq}: ratio to prediction between "
                                 f"{ratio.min():.3g} and {ratio.max():.3g}{tail}; please report this")
    direct = summary.get("direct_rate") or {}
    want = summary.get("predicted_direct_rate_with_f", summary.get("predicted_direct_rate"))
    if direct and math.isfinite(direct.get("slope", float("nan"))):
        pred_txt = (f"predicted {want:+.4f}" if isinstance(want, float) and math.isfinite(want)
                    else "no closed-form rate")
        match = summary.get("direct_matches_prediction")
        judge = {True: "as predicted", False: "not the predicted rate", None: "measured only"}[match]
        out["direct_rate"] = (f"direct term changes by {direct['slope']:+.4f} log per unit toward the input "
                              f"({pred_txt}): {judge}")
    total = summary.get("total_rate") or {}
    s = total.get("slope", float("nan"))
    if math.isfinite(s):
        lo, hi = total.get("ci_low", s), total.get("ci_high", s)
        across = math.exp(max(min(s * n, 700), -700))
        if abs(s) < LEVEL:
            out["total"] = f"total gradient stays level across depth ({s:+.4f} log per unit, 95% CI {lo:+.4f}..{hi:+.4f})"
        elif s > 0:
            out["total"] = (f"total gradient grows toward the input ({s:+.3f} log per unit, about x{across:.3g} "
                            f"over {n} units): the residual paths amplify it")
        else:
            out["total"] = (f"total gradient shrinks toward the input ({s:+.3f} log per unit, about x{across:.3g} "
                            f"over {n} units): it vanishes with depth")
        if "direct" in out and eq != "no closed form":
            out["total"] += f"; the prediction ({eq}) is about the direct term, not this total"
    c = summary.get("cancel_frac_max")
    if c is not None and math.isfinite(c):
        out["cancel"] = ("the residual term never cancels the direct one: the gradient cannot vanish "
                         "(eq. 5's argument)" if c == 0 else
                         f"the residual term cancels the direct one in up to {c:.0%} of samples at some unit")
    return out


def variant_report(v) -> dict:
    """JSON-safe report of one VariantResult."""
    return clean(dict(label=v.label, model=v.model, options=v.options, source=v.source,
                      units=int(v.summary.get("units", 0)), equation=equation(v.summary, v.units),
                      stages=stage_rows(v.units), verdicts=verdicts(v.summary, v.units),
                      summary=v.summary, timings=v.timings, checkpoint=v.checkpoint_info))


def report_dict(result, files: dict | None = None) -> dict:
    """The whole probe as one JSON-safe dict (what --json prints and summary.json holds)."""
    return clean(dict(inputs=result.inputs, config=result.config,
                      variants=[variant_report(v) for v in result.variants.values()],
                      files=files or {}))


def format_report(report: dict) -> str:
    """The compact text report: a block per network, or one line per network when comparing."""
    cfg = report["config"]
    head = [f"input: {report['inputs']}",
            f"mode {cfg['mode']}, device {cfg['device']}, seed {cfg['seed']}, "
            f"batch {cfg['batch_size']} x {cfg['batches']}, image {cfg['image_size']}px"]
    vs = report["variants"]
    body = _compare_lines(vs) if len(vs) > 1 else _single_lines(vs[0])
    files = report.get("files") or {}
    tail = [f"wrote {', '.join(files.values())}"] if files else []
    return "\n".join(head + [""] + body + ([""] + tail if tail else []))


def _single_lines(v: dict) -> list[str]:
    opts = ", ".join(f"{k}={x}" for k, x in v["options"].items())
    lines = [f"{v['model']}{f' ({opts})' if opts else ''}: {v['units']} residual units, prediction: {v['equation']}",
             "ratios are ||dE/dx_l|| / ||dE/dx_L||, batch means of per-sample ratios",
             f"{'stage':<6}{'units':<10}{'x shape':<11}{'total first->last':<22}"
             f"{'direct (pred) first':<23}{'direct (pred) last':<23}{'cancel':>7}"]
    for r in v["stages"]:
        f, l = r["first"], r["last"]
        lines.append(f"{r['stage']:<6}{r['units'][0]}-{r['units'][1]:<{9 - len(str(r['units'][0]))}}"
                     f"{r['x_shape']:<11}{_g(f['grad_ratio']) + ' -> ' + _g(l['grad_ratio']):<22}"
                     f"{_dp(f):<23}{_dp(l):<23}{_pct(r['cancel_frac_max']):>7}")
        lines.append(f"      {r['verdict']}")
    lines.append("network (fitted change of log ratio per unit toward the input):")
    lines += [f"  {k:<12}{t}" for k, t in v["verdicts"].items()]
    return lines


def _compare_lines(vs: list[dict]) -> list[str]:
    w = max(12, max(len(v["label"]) for v in vs) + 2)
    lines = [f"{'network':<{w}}{'total@0':>10}{'direct@0':>10}{'pred@0':>10}{'total/unit':>11}"
             f"{'direct/unit':>12}{'pred/unit':>10}{'cancel':>8}  verdict"]
    for v in vs:
        s = v["summary"] or {}
        u0 = v["stages"][0]["first"] if v["stages"] else {}
        tot = (s.get("total_rate") or {}).get("slope")
        dr = (s.get("direct_rate") or {}).get("slope")
        pr = s.get("predicted_direct_rate_with_f", s.get("predicted_direct_rate"))
        verdict = v["verdicts"].get("direct", "").split(":")[0]
        lines.append(f"{v['label']:<{w}}{_g(u0.get('grad_ratio')):>10}{_g(u0.get('direct_ratio')):>10}"
                     f"{_g(u0.get('pred_direct_ratio')):>10}{_r(tot):>11}{_r(dr):>12}{_r(pr):>10}"
                     f"{_pct(s.get('cancel_frac_max')):>8}  {verdict}")
    lines.append("@0: at the first unit (input side); /unit: fitted change of log ratio per unit toward the input")
    return lines


def _dp(end: dict) -> str:
    return f"{_g(end.get('direct_ratio'))} ({_g(end.get('pred_direct_ratio'))})"


def _g(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _r(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.0%}"


def _num(x: Any) -> Any:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN and infinities to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
