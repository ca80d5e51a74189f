"""The trainability check's outputs: the predictor table, the rank-check table, lines for the caption,
and the figure (predicted rank against final test error, one point per variant, seeds as error bars)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from gradflow.experiments.stats import rankdata
from gradflow.trainability.check import best_predictor
from gradflow.trainability.predictors import BY_NAME, PREDICTORS

FAIL_Y = 25.0      # where the paper's "fail" (above 20%) is drawn


def seed_ranks(predictors: pd.DataFrame, name: str, keys: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted rank (1: predicted to train best) of each variant from its median score, and the
    lowest and highest rank it gets when each init seed's score is ranked alone."""
    sign = BY_NAME[name].sign
    g = {v: sign * d[name].to_numpy(float) for v, d in predictors.groupby("variant")}
    med = rankdata([np.median(g[k]) for k in keys])
    seeds = sorted(set(predictors["seed"]))
    per = []
    for s in seeds:
        col = []
        for k in keys:
            d = predictors[(predictors["variant"] == k) & (predictors["seed"] == s)][name]
            col.append(sign * float(d.iloc[0]) if len(d) else np.median(g[k]))
        per.append(rankdata(col))
    per = np.array(per)
    return med, per.min(0), per.max(0)


def lines(table: pd.DataFrame, notes: list[str], runs: Optional[pd.DataFrame]) -> list[str]:
    """What the check found, in plain sentences, for the results file and the caption."""
    out = []
    for outcome in dict.fromkeys(table["outcome"]):
        t = table[table["outcome"] == outcome]
        untested = t["verdict"].str.startswith("not tested")
        if untested.all():
            out.append(f"{outcome}: not tested: {int(t['variants'].max())} variant(s) with an outcome, at least 3 "
                       "needed for a rank correlation with an interval")
            continue
        t = t[~untested]
        best = best_predictor(table, outcome)
        ok = t[t["verdict"] == "predicts"]
        bad = t[t["verdict"] != "predicts"]
        out.append(f"{outcome}: {len(ok)} of {len(t)} predictors rank the variants as they claim "
                   f"(Spearman's 95% bootstrap interval above 0)"
                   + (f"; best: {best} (rho {float(t[t.predictor == best].spearman.iloc[0]):.2f}, highest in "
                      f"{100 * float(t[t.predictor == best].p_best.iloc[0]):.0f}% of bootstrap replicates)"
                      if best else "; none does"))
        if len(bad):
            out.append(f"{outcome}: failing: " + "; ".join(
                f"{r.predictor} rho {r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}] ({r.verdict})"
                for r in bad.itertuples()))
    if runs is not None and len(runs):
        rep = runs[runs["repeat"]]
        if len(rep):
            out.append(f"{len(rep)} run(s) repeat a seed of their variant from another row (the same network "
                       "and seed), each counted once: " + "; ".join(
                           f"{r.row} seed {r.seed}" for r in rep.itertuples()))
            runs = runs[~runs["repeat"]]
        div = runs[runs["diverged"]]
        n = runs.groupby("variant")["seed"].nunique()
        out.append(f"laptop runs: {len(runs)} finished run(s) of {runs['variant'].nunique()} variant(s), "
                   f"{n.min()} to {n.max()} seed(s) each; {len(div)} diverged (counted at chance error)"
                   + (": " + "; ".join(f"{r.variant} seed {r.seed}: {r.note}" for r in div.itertuples())
                      if len(div) else ""))
        if n.max() < 3:
            out.append("fewer than 3 training seeds per variant: the laptop outcome's spread over seeds is "
                       "barely sampled, and its intervals understate the uncertainty")
    out += notes
    return out


def figure(predictors: pd.DataFrame, outcomes: dict, table: pd.DataFrame, runs: Optional[pd.DataFrame],
           title: str = ""):
    """One panel per (outcome, predictor): predicted rank (x, seeds' range as bars) against the test
    error (y; the laptop's median with its seeds' range; diverged runs as red crosses; the paper's
    "fail" drawn at 25%)."""
    import matplotlib.pyplot as plt
    names = [p.name for p in PREDICTORS if p.name in predictors]
    fig, axes = plt.subplots(len(outcomes), len(names), figsize=(2.6 * len(names), 2.8 * len(outcomes)),
                             squeeze=False, sharey="row")
    for i, (outcome, values) in enumerate(outcomes.items()):
        for j, n in enumerate(names):
            ax = axes[i][j]
            keys = [v for v in dict.fromkeys(predictors["variant"]) if len(values.get(v, ())) and not
                    np.isnan(np.median(predictors[predictors.variant == v][n].to_numpy(float)))]
            if not keys:
                ax.set_axis_off()
                continue
            x, lo, hi = seed_ranks(predictors, n, keys)
            y = np.array([np.median(values[k]) for k in keys], float)
            ylo = np.array([np.min(values[k]) for k in keys], float)
            yhi = np.array([np.max(values[k]) for k in keys], float)
            fail = np.isinf(y)
            y, ylo, yhi = (np.where(np.isinf(a), FAIL_Y, a) for a in (y, ylo, yhi))
            ax.errorbar(x, y, xerr=[np.clip(x - lo, 0, None), np.clip(hi - x, 0, None)],
                        yerr=[np.clip(y - ylo, 0, None), np.clip(yhi - y, 0, None)], fmt="o", ms=3.5, lw=0.8,
                        capsize=1.5, color="C0")
            if fail.any():
                ax.plot(x[fail], y[fail], "v", color="C3", ms=5, label='paper "fail" (>20%)')
            if runs is not None and outcome == "laptop":
                div = runs[runs["diverged"] & ~runs["repeat"]]
                for k in set(div["variant"]) & set(keys):
                    err = div[div.variant == k]["error"].to_numpy(float)     # one cross per run
                    ax.plot(np.full(len(err), x[keys.index(k)]), err, "x", color="C3", ms=6,
                            label="diverged run")
            r = table[(table.outcome == outcome) & (table.predictor == n)]
            if len(r):
                r = r.iloc[0]
                ok = "" if r.verdict == "predicts" else " FAILS"
                ax.set_title(f"{n}\nrho {r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}]{ok}",
                             fontsize=8)
            ax.set_xlabel("predicted rank (1: best)", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{outcome}: test error %", fontsize=8)
            ax.tick_params(labelsize=7)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                seen = dict(zip(labels, handles))
                ax.legend(seen.values(), seen.keys(), fontsize=6, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3g}")
    return str(v)


def markdown(title: str, about: list[str], table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The results file: what was run, the rank-check table, and the predictors per variant."""
    out = [f"# {title}", ""] + [f"- {a}" for a in about] + ["", "## Rank check", ""]
    cols = list(table.columns)
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    out += ["", "## Predictors per variant (median over init seeds, min-max in brackets)", ""]
    cols = list(summary.columns)
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for _, r in summary.iterrows()]
    return "\n".join(out) + "\n"


def summary(predictors: pd.DataFrame, outcomes: dict) -> pd.DataFrame:
    """One line per variant: each predictor's median [min, max] over seeds, the law, the outcomes."""
    rows = []
    for v, g in predictors.groupby("variant", sort=False):
        row = {"variant": v}
        for p in PREDICTORS:
            if p.name in g:
                a = g[p.name].to_numpy(float)
                row[p.name] = f"{np.median(a):.3g} [{a.min():.3g}, {a.max():.3g}]"
        laws = g["growth_law"].tolist()
        row["growth_law"] = max(set(laws), key=laws.count)
        for o, vals in outcomes.items():
            e = vals.get(v)
            row[f"{o}_error"] = ("-" if not e else "fail" if np.isinf(np.median(e)) else
                                 f"{np.median(e):.2f}" + (f" [{min(e):.2f}, {max(e):.2f}]" if len(e) > 1 else ""))
        rows.append(row)
    return pd.DataFrame(rows)
