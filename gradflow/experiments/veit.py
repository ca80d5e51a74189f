"""Whether Veit et al. 2016's findings appear, computed from the path and lesion tables (never
written by hand), for the captions of ``python -m gradflow paths``.

Veit's findings, on trained networks (docs/theory.md, section 8):

- Fig. 6b: the gradient of one path falls exponentially with its length k;
- Fig. 6c: per-path magnitude times the number of paths puts almost all of the gradient on paths far
  shorter than the typical path (5-17 of ResNet-110's 54 branches, where 95% of the paths pass 19-35);
- Fig. 3/5a: removing one unit barely changes the test error, except at downsampling units.

Each line says "appears" or "does NOT appear", with the numbers it rests on, and where the network
is at initialisation it says that Veit's findings are about trained networks.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

VEIT_SAMPLES = 1000     # sampled paths per length in Veit et al.
SMALL_CHANGE = 2.0      # points of test error: "barely changes"
VEIT_ERROR = 6.5        # % test error of Veit et al.'s CIFAR-10 ResNets (110 layers: 6.4-6.6%)
FAR_FROM_TRAINED = 20.0  # % test error above which a network is not the trained network his findings are about


def training_caveat(error: Optional[float]) -> list[str]:
    """A line saying the verdicts are not a replication when the network is far from trained (error in %)."""
    if error is None or error <= FAR_FROM_TRAINED:
        return []
    return [f"The network is far from trained ({error:.1f}% test error; Veit's CIFAR-10 ResNets reached about "
            f"{VEIT_ERROR:g}%): each verdict above is about this network, not a replication of his findings "
            "on trained networks."]


def path_bulk(n: int, mass: float = 0.95) -> tuple[int, int]:
    """The shortest window of path lengths holding ``mass`` of the 2^n paths (Binomial(n, 1/2))."""
    w = np.array([math.comb(n, k) for k in range(n + 1)], float) / 2.0 ** n
    best, best_mass = (0, n), 1.0
    for lo in range(n + 1):
        acc = 0.0
        for hi in range(lo, n + 1):
            acc += w[hi]
            if acc >= mass:     # the narrowest window; of equally narrow ones, the one holding most
                if hi - lo < best[1] - best[0] or (hi - lo == best[1] - best[0] and acc > best_mass):
                    best, best_mass = (lo, hi), acc
                break
    return best


def path_lines(exact: pd.DataFrame, sampled: pd.DataFrame, n: int, samples: int,
               trained: Optional[str] = None, error: Optional[float] = None) -> list[str]:
    """Lines on Fig. 6b and 6c for one network.

    Args:
        exact: :func:`gradflow.tracing.paths.path_components`'s table (``unit``, ``k``, ``norm``, ``proj``).
        sampled: :func:`sample_paths`' table (``k``, ``path_norm``, ``total``).
        n: the number of units.
        samples: sampled paths per length.
        trained: a description of the training (None: the network is at initialisation).
        error: the trained network's test error in % (None: unknown); above
            ``FAR_FROM_TRAINED`` the lines say the verdicts are not a replication.
    """
    from gradflow.theory.fits import fit_slope
    from gradflow.theory.paths import effective_range
    where = (f"on the trained network ({trained})" if trained else
             "at initialisation (Veit's findings are about trained networks: this is the network before training)")
    out = []
    s = sampled[(sampled["k"] >= 0) & (sampled["path_norm"] > 0)]
    if len(s) >= 3:
        fit = fit_slope(s["k"].to_numpy(float), np.log10(s["path_norm"].to_numpy(float)))
        ok = fit.ci_high < 0
        out.append(f"Veit Fig. 6b (one path's gradient falls exponentially with its length) "
                   f"{'appears' if ok else 'does NOT appear'} {where}: log10 of the sampled per-path norm changes by "
                   f"{fit.slope:.3g} per branch (95% CI [{fit.ci_low:.3g}, {fit.ci_high:.3g}], R^2 {fit.r2:.2f}, "
                   f"{fit.n} lengths).")
    lo, hi = path_bulk(n)
    rv = effective_range(sampled.assign(unit=0, n_units=n), column="total")
    ks = np.unique(sampled.loc[sampled["k"] >= 0, "k"].to_numpy(int))
    step = int(np.diff(ks).max()) if len(ks) > 1 else 1
    # sampled every step-th length: the window's true upper end lies in [hi, hi + step - 1]
    top = min(rv["hi"] + step - 1, n)
    verdict = ("appears" if top < lo else "does NOT appear" if rv["hi"] >= lo else
               f"is not established at this resolution (lengths sampled every {step}: the window's upper end "
               f"lies in {rv['hi']}-{top}, across the bulk's lower end {lo}; pass --k-step 1)")
    out.append(f"Veit Fig. 6c (most of the gradient on paths far shorter than the typical path) "
               f"{verdict} {where}: his estimate puts 90% of the gradient on "
               f"k = {rv['lo']}-{rv['hi']}" + (f" (every {step}th length sampled)" if step > 1 else "")
               + f", while 95% of the 2^{n} paths have k = {lo}-{hi}.")
    if "proj" in exact:
        first = exact[exact["unit"] == exact["unit"].min()]
        neg = bool((first.loc[first["k"] >= 0, "proj"] < 0).any())
        rp = effective_range(exact.assign(proj=exact["proj"].clip(lower=0)), column="proj")
        out.append(f"exact split: the projections <g^(k), dE/dx_0> / ||dE/dx_0||^2, which add up to 1, put 90% on "
                   f"k = {rp['lo']}-{rp['hi']}" + (" (negative projections, paths that cancel, counted as 0 in "
                                                  "the window)" if neg else "") + ".")
    if samples < VEIT_SAMPLES:
        out.append(f"{samples} sampled paths per length, fewer than Veit's {VEIT_SAMPLES:,}: pass --samples "
                   f"{VEIT_SAMPLES} for his estimate.")
    return out + (training_caveat(error) if trained else [])


def lesion_lines(single: pd.DataFrame, baseline: float, network: str, trained: str,
                 intact: Optional[np.ndarray] = None, lesioned: Optional[dict] = None,
                 replicates: int = 2000, seed: int = 0) -> list[str]:
    """Fig. 3/5a on one network: the test error with one unit's branch removed, downsampling apart.

    Args:
        single: :func:`gradflow.experiments.lesion.lesion_study`'s single-removal table.
        baseline: the intact test error (%).
        network, trained: what the line calls the network and its training.
        intact, lesioned: per test image, right or not, intact and with each unit removed
            (``LesionResult.intact_correct``, ``.single_correct``). With them the median rise
            gets a 95% interval from a paired bootstrap over the test images (one redraw for the
            intact net and every lesion), and the verdict holds only where the interval does.
        replicates, seed: the bootstrap's.
    """
    s = single[single["removable"] & single["error"].notna()]
    if s.empty:
        return [f"{network}: no unit could be removed: Veit's single-lesion finding is not tested."]
    rest = s[~s["downsampling"]]
    rise = rest["error"] - baseline
    med = float(rise.median()) if len(rest) else float("nan")
    units = [int(u) for u in rest["unit"]]
    ci = (_paired_median_rise(intact, [lesioned[u] for u in units], replicates, seed)
          if intact is not None and lesioned and units and all(u in lesioned for u in units) else None)
    if ci is None:
        verdict = "appears" if len(rest) and med <= SMALL_CHANGE else "does NOT appear"
        spread = "no interval: the per-image results were not kept"
    else:
        lo, hi = ci
        verdict = ("appears" if hi <= SMALL_CHANGE else "does NOT appear" if lo > SMALL_CHANGE
                   else "is not established either way")
        spread = (f"95% interval [{lo:+.2f}, {hi:+.2f}] from a paired bootstrap over the {len(intact)} "
                  f"test images ({replicates} replicates)")
    return [f"Veit Fig. 3 (removing one non-downsampling unit barely changes the error) "
            f"{verdict} on {network} ({trained}): intact {baseline:.2f}%, one unit "
            f"removed: median {med:+.2f} points ({spread}; range {float(rise.min()):+.2f} to "
            f"{float(rise.max()):+.2f}) over {len(rest)} units; 'barely' read as at most {SMALL_CHANGE:g} points."
            ] + training_caveat(baseline)


def _paired_median_rise(intact: np.ndarray, lesioned: list, replicates: int, seed: int) -> tuple:
    """95% interval of the median over units of (error with the unit removed - intact error), in
    points, redrawing the test images with replacement (the same redraw for every network)."""
    n = len(intact)
    wrong = np.stack([~np.asarray(c, bool) for c in lesioned]).astype(float)        # [units, images]
    base = (~np.asarray(intact, bool)).astype(float)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)  # [replicates, images]
    rises = 100.0 * (counts @ (wrong - base).T) / n                                   # [replicates, units]
    from gradflow.experiments.stats import percentile_interval
    return percentile_interval(np.median(rises, axis=1))
