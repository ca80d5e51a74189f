"""Whether a results table shows the paper's ordering: computed from the table, never written by hand.

For each panel (the rows of one depth), every pair of rows the paper tells apart (two errors, or an
error and "fail" = above 20%) is checked against the medians measured here. The lines say how many
pairs keep the paper's order, which are reversed, which rows are near chance, and what one seed
cannot establish.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import pandas as pd

FAIL = 20.0   # the paper's "fail": test error above 20% (docs/theory.md, section 7.4)
NEAR_CHANCE = 5.0   # points: a row this close to chance did not learn


def paper_rank(paper_error: str) -> Optional[float]:
    """The paper's error as a sortable number: a float, ``inf`` for "fail", None if not given."""
    s = str(paper_error or "").strip()
    if s == "fail":
        return math.inf
    try:
        return float(s)
    except ValueError:
        return None


def _label(row: str) -> str:
    return row.split("-", 1)[1] if row.startswith(("table", "fig1-", "depth-")) else row


def _paper_text(v: float) -> str:
    return "fail" if math.isinf(v) else f"{v:.2f}"


def concordance(paper: dict[str, float], here: dict[str, float]) -> tuple[list, list, list]:
    """Pairs (a, b) with a better than b in the paper, split into (kept, reversed, tied) here.

    Two rows the paper does not tell apart (both "fail", or equal errors) are not a pair.
    """
    kept, rev, tied = [], [], []
    for a, b in itertools.combinations(paper, 2):
        if paper[a] == paper[b]:
            continue
        a, b = (a, b) if paper[a] < paper[b] else (b, a)
        d = here[b] - here[a]
        (kept if d > 0 else rev if d < 0 else tied).append((a, b))
    return kept, rev, tied


def _chance(dataset: str) -> float:
    return 100 * (1 - 1 / (100 if dataset == "cifar100" else 10))


def ordering_lines(table: pd.DataFrame, groups: dict[str, str]) -> list[str]:
    """Lines on the paper's ordering for a results table (``results_table``'s columns).

    Args:
        table: one line per row: ``row``, ``dataset``, ``paper_error``, ``median_error`` (%),
            ``seeds_finished``, ``spread`` (max - min over seeds, %).
        groups: {row name: panel}; rows are compared within their panel only.
    Returns:
        Markdown-free lines for the results file and the captions.
    """
    out = []
    done = table[table["median_error"].notna()]
    near = [f"{_label(r.row)} {r.median_error:.2f}%" for r in done.itertuples()
            if r.median_error >= _chance(r.dataset) - 5]
    if near:
        out.append("near chance (test error within 5 points of chance, 90% on CIFAR-10, 99% on CIFAR-100: "
                   "it did not learn): " + ", ".join(near))
    for panel in dict.fromkeys(groups.get(r, "") for r in table["row"]):
        mine = done[[groups.get(r, "") == panel for r in done["row"]]]
        paper = {r.row: paper_rank(r.paper_error) for r in mine.itertuples()}
        paper = {k: v for k, v in paper.items() if v is not None}
        here = {r.row: float(r.median_error) for r in mine.itertuples() if r.row in paper}
        where = f" ({panel})" if panel else ""
        if len(paper) < 2:
            out.append(f"ordering{where}: fewer than two finished rows with a paper error: nothing to compare")
            continue
        # a row near chance did not learn: set to chance, two such rows tie (never "in the paper's order")
        sets = {r.row: _chance(r.dataset) for r in mine.itertuples()}
        learned = {k: sets[k] if v >= sets[k] - NEAR_CHANCE else v for k, v in here.items()}
        kept, rev, tied = concordance(paper, learned)
        n = len(kept) + len(rev) + len(tied)
        by_paper = sorted(paper, key=lambda k: (paper[k], here[k]))
        by_here = sorted(here, key=lambda k: here[k])
        verdict = ("the paper's ordering appears in full" if not rev and not tied else
                   "the paper's ordering does NOT appear" if len(kept) <= len(rev) else
                   "the paper's ordering appears only in part")
        out.append(f"ordering{where}: paper, lowest error first: "
                   + " < ".join(f"{_label(k)} {_paper_text(paper[k])}" for k in by_paper)
                   + "; here: " + " < ".join(f"{_label(k)} {here[k]:.2f}" for k in by_here)
                   + f". {len(kept)} of {n} pairs the paper tells apart keep its order, {len(rev)} "
                   + ("is" if len(rev) == 1 else "are") + " reversed"
                   + (f", {len(tied)} tied" if tied else "")
                   + (" (rows near chance count as tied with each other)" if learned != here else "")
                   + f": {verdict} at this scale.")
        if rev:
            out.append(f"reversed{where}: " + "; ".join(
                f"{_label(a)} ({_paper_text(paper[a])} in the paper) vs {_label(b)} ({_paper_text(paper[b])}): "
                f"here {here[a]:.2f} vs {here[b]:.2f}" for a, b in rev))
        fails = [k for k in paper if math.isinf(paper[k])]
        if fails:
            above = [k for k in fails if here[k] > FAIL]
            out.append(f"rows the paper reports as failing (error above {FAIL:.0f}%){where}: "
                       + ", ".join(f"{_label(k)} {here[k]:.2f}" for k in fails)
                       + f"; {len(above)} of {len(fails)} above {FAIL:.0f}% here"
                       + (" (at this scale every row is above 20%, so this does not tell them apart)"
                          if (mine["median_error"] > FAIL).all() else "") + ".")
    seeds = sorted(set(int(s) for s in done["seeds_finished"])) if len(done) else []
    if seeds and max(seeds) <= 1:
        out.append("one seed per row: there is no spread to compare differences with, so an ordering of rows "
                   "a few points apart is not established.")
    elif len(done):
        out.append(f"spread over seeds (max - min) up to {done['spread'].max():.2f} points: a pair closer than "
                   "that is not established.")
    return out
