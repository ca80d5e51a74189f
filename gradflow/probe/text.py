"""The probe's text report: the finding first, then a block per network, or one line per network when comparing.

A function of :func:`gradflow.probe.report.report_dict`'s dict only.
"""
from __future__ import annotations

from gradflow.probe.report import _g, _pct, _shape_word


def format_report(report: dict) -> str:
    """The text report: the finding first, then a block per network (or one line per network when comparing)."""
    cfg = report["config"]
    head = [f"input: {report['inputs']}",
            f"mode {cfg['mode']}, device {cfg['device']}, seed {cfg['seed']}, "
            f"batch {cfg['batch_size']} x {cfg['batches']}, "
            + (f"sequence {cfg['seq_len']} tokens" if cfg.get("seq_len") else f"image {cfg['image_size']}px")]
    vs = report["variants"]
    lead, rest = _compare_lines(vs) if len(vs) > 1 else _single_lines(vs[0])
    files = report.get("files") or {}
    tail = [f"wrote {', '.join(files.values())}"] if files else []
    return "\n".join(lead + [""] + head + [""] + rest + ([""] + tail if tail else []))


def _single_lines(v: dict) -> tuple[list[str], list[str]]:
    opts = ", ".join(f"{k}={x}" for k, x in v["options"].items())
    lead = [f"{v['model']}{f' ({opts})' if opts else ''}: {v['n_units']} residual units",
            f"finding: {v['finding']['text']}"]
    if v.get("by_construction"):
        lead.append(f"by construction: {v['by_construction']}")
    if "samples" in v["verdicts"]:
        lead.append(f"samples: {v['verdicts']['samples']}")
    said = bool(v.get("by_construction"))       # the exact eq. (5)/(8) agreement: said once, above
    lines = ([] if said else [f"eq. (5)/(8) for the direct term: {v['equation']}"]) + [
             "ratios: ||dE/dx_l|| / ||dE/dx_L||, ratio of batch medians; share: ||direct|| / ||dE/dx_l||; "
             "gsc: gradient scale coefficient",
             f"{'stage':<6}{'units':<10}{'x shape':<11}{'total first->last':<22}{'growth':>9}  "
             f"{'gsc first':>9}  {'direct first->last':<22}{'share first->last':<22}{'cancel':>7}"]
    for r in v["stages"]:
        a, b = r["start"], r["end"]
        span = f"{r['own_units'][0]}-{r['own_units'][1]}"
        growth = "-" if r["growth"] is None else f"x{r['growth']:.3g}"
        lines.append(f"{r['stage']:<6}{span:<10}{r['x_shape']:<11}"
                     f"{_g(a['total']) + ' -> ' + _g(b['total']):<22}{growth:>9}  {_g(a.get('gsc')):>9}  "
                     f"{_g(a['direct']) + ' -> ' + _g(b['direct']):<22}"
                     f"{_pct(a.get('share')) + ' -> ' + _pct(b.get('share')):<22}{_pct(r['cancel_frac_max']):>7}")
        for p in r["projections"]:
            dc = "" if p["direct_change"] is None else f", direct term x{p['direct_change']:.3g} across it"
            lines.append(f"      unit {p['unit']} projects {p['from_shape']} -> {p['to_shape']}{dc}")
        lines.append(f"      {r['verdict']}")
    lines.append("network:")
    lines += [f"  {k:<12}{t}" for k, t in v["verdicts"].items() if k != "samples" and not (said and k == "direct")]
    return lead, lines


def _compare_lines(vs: list[dict]) -> tuple[list[str], list[str]]:
    w = max(12, max(len(v["label"]) for v in vs) + 2)
    lines = ["finding, per network: at the first unit (x_L = 1), the total as the ratio of batch medians and "
             "the mean of per-sample ratios, the direct term, its share, the isotropy prediction, the "
             "gradient scale coefficient, degenerate samples, and the profile's shape per stage",
             f"{'network':<{w}}{'total@0':>10}{'mean@0':>10}{'direct@0':>10}{'share@0':>9}{'rms@0':>10}{'iso@0':>10}"
             f"{'gsc@0':>9}{'degen':>7}  shape per stage"]
    for v in vs:
        u0 = v["stages"][0]["first"] if v["stages"] else {}
        deg = len((v.get("analysis") or {}).get("degenerate") or [])
        n = (v.get("analysis") or {}).get("batch")
        shape = "; ".join(_shape_word(s) for s in v["stages"] if s["growth"] is not None)
        lines.append(f"{v['label']:<{w}}{_g(u0.get('total')):>10}{_g(u0.get('grad_ratio')):>10}"
                     f"{_g(u0.get('direct')):>10}{_pct(u0.get('share')):>9}{_g(u0.get('grad_ratio_rms')):>10}"
                     f"{_g(u0.get('iso_ratio')):>10}"
                     f"{_g(u0.get('gsc')):>9}{(f'{deg}/{n}' if n else '-'):>7}  {shape}")
    notes = ["@0: at the first unit (input side); total: ratio of batch medians; mean: mean of per-sample "
             "ratios; rms: ratio of the batch's RMS norms; iso: its isotropy prediction; shape: exponential (x per unit), power "
             "law in Var(x_l) (exponent) or neither, from bootstrap fits over samples",
             "eq. (5)/(8) hold for the direct term by construction wherever they cover a unit: not a finding"]
    notes += [f"{v['label']}: {v['verdicts']['samples']}" for v in vs
              if (v.get("analysis") or {}).get("degenerate")]
    return lines, notes
