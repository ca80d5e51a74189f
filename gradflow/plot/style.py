"""The figures' shared style: sizes, colours, titles and legends that fit, panel helpers."""
from __future__ import annotations

import contextlib
import functools
import math
import textwrap
from typing import Mapping, Optional, Union

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradflow.errors import GradflowError
from gradflow.theory import shape_groups


Records = Union[pd.DataFrame, Mapping[str, pd.DataFrame]]

PANEL_W, PANEL_H = 3.4, 2.6   # inches per panel: two panels span a paper's text width
MIN_W = 6.0                   # inches: a figure narrower than this cannot hold its title and legend
COLOURS = {"total": "#0173b2", "direct": "#de8f05", "predicted": "#222222", "fit": "#cc3311"}


@contextlib.contextmanager
def style(font_scale: float = 1.0):
    """The one style of gradflow's figures (seaborn 'ticks' + 'paper'), for this block only."""
    import seaborn as sns  # here: seaborn imports scipy.stats (~1 s); the probe's figure needs neither
    rc = {"axes.grid": True, "grid.linestyle": ":", "grid.alpha": 0.6, "legend.frameon": False,
          "figure.dpi": 100, "savefig.dpi": 200}
    with sns.axes_style("ticks", rc=rc), sns.plotting_context("paper", font_scale=font_scale, rc=rc):
        with mpl.rc_context({k: v for k, v in rc.items() if k not in ("backend", "interactive")}):
            yield


def subplots(*args, **kwargs):
    """``Figure.subplots`` on a Figure outside pyplot: no global figure list, nothing leaks.

    Notebooks display the returned Figure as a cell's value (``fig``), scripts save it.
    """
    w, h = kwargs.pop("figsize")
    fig = Figure(figsize=(max(w, MIN_W), h), layout="constrained")
    return fig, fig.subplots(*args, **kwargs)


def fig_title(fig: Figure, text: str) -> None:
    """The figure's title, wrapped so that every line fits the figure's width (measured, not guessed)."""
    title = fig.suptitle(text)
    _wrap_to(title, text, fig.get_figwidth() * 0.97, fig, paragraphs=False)


def axes_title(ax, text: str, fig: Figure, share: float = 1.0, **kwargs) -> None:
    """An axes title wrapped so that every line fits inside the figure, centred where the axes is.

    The title is centred on the axes, and the axes sits where the layout puts it (long
    tick labels on the left push it right): the width a line may take is twice the
    distance from the axes' centre to the nearer edge of the figure, once laid out, and
    at most the axes' share of the figure.
    """
    title = ax.set_title(text, **kwargs)
    width = fig.get_figwidth()
    budget = width * share * 0.95
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        box = ax.get_position()
        centre = (box.x0 + box.x1) / 2 * width
        budget = min(budget, 2 * min(centre, width - centre) * 0.97)
    _wrap_to(title, text, budget, fig, paragraphs=True)


def _wrap_to(artist, text: str, width_in: float, fig: Figure, paragraphs: bool) -> None:
    """Re-wrap ``artist``'s text at fewer characters per line until its drawn width is under ``width_in``.

    Measured with Agg renderers, so the font and the style context in force decide (a
    character count per inch clipped long titles at the paper context's font size), at
    the dpis figures are shown and saved at, taking the widest: hinting makes the same
    line 4.65 in wide at 100 dpi and 4.95 in at 200, so a title measured on screen was
    clipped in the file.
    """
    from matplotlib.backends.backend_agg import RendererAgg
    w, h = fig.get_figwidth(), fig.get_figheight()
    renderers = [(RendererAgg(int(w * d), int(h * d), d), d) for d in sorted({fig.dpi, 100, 160, 200, 300})]
    chars = max(len(line) for line in text.split("\n"))
    while True:
        lines = text.split("\n") if paragraphs else [text.replace("\n", " ")]
        artist.set_text("\n".join(textwrap.fill(line, chars) for line in lines))
        widest = max(artist.get_window_extent(r, dpi=d).width / d for r, d in renderers)
        if chars <= 16 or widest <= width_in:
            return
        chars = int(chars * 0.9)


def styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


# --- helpers ------------------------------------------------------------------------------

def split_records(records: Records, by: str) -> list[tuple[str, pd.DataFrame]]:
    """[(label, table)] from a dict of tables or one table with a ``by`` column (order kept)."""
    if isinstance(records, Mapping):
        return [(str(k), v) for k, v in records.items()]
    if not isinstance(records, pd.DataFrame):
        raise GradflowError(f"expected a DataFrame or a dict of DataFrames, got {type(records).__name__}")
    if by in records:
        return [(str(k), records[records[by] == k]) for k in pd.unique(records[by])]
    return [("", records)]


def at_step(units: pd.DataFrame, step: Optional[int]) -> pd.DataFrame:
    if "step" not in units:
        return units
    step = units["step"].max() if step is None else step
    return units[units["step"] == step]


def unit_rows(units: pd.DataFrame) -> pd.DataFrame:
    body = units[~units["is_top"].astype(bool)] if "is_top" in units else units
    return body.sort_values("unit")


def panel_grid(n: int, ncols: Optional[int] = None, sharex: bool = False, sharey: bool = False,
            w: float = PANEL_W, h: float = PANEL_H):
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.9), squeeze=False,
                             sharex=sharex, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def shape_changes(body: pd.DataFrame) -> np.ndarray:
    """Positions between units where the input shape changes: (l + l') / 2 for consecutive units l, l'.

    That is where a projection shortcut sits: unit l still reads the old shape,
    unit l' the new one, and the norms of x_l and dE/dx_l change meaning there.
    """
    b = body.drop_duplicates("unit").sort_values("unit") if "unit" in body else body
    if b.empty or ("x_shape" not in b and "stage" not in b):
        return np.array([])
    key = shape_groups(b.drop(columns=["step"], errors="ignore"))
    u = b["unit"].to_numpy(float)
    at = np.flatnonzero(key[1:] != key[:-1])
    return (u[at] + u[at + 1]) / 2


def stage_lines(ax, body: pd.DataFrame) -> None:
    """Dotted verticals where the signal's shape changes (projection shortcuts: norms change meaning)."""
    for i, x in enumerate(shape_changes(body)):
        ax.axvline(x, color="0.5", lw=0.8, ls=":", zorder=0, label="shape change (projection)" if i == 0 else None)


def legend_below(fig: Figure, axes, ncol: int = 4) -> None:
    """One legend under the panels, with every label any panel uses (once)."""
    seen: dict = {}
    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    handles, labels = list(seen.values()), list(seen)
    if handles:
        # as many columns as the figure's width holds (a legend wider than the figure is clipped)
        col_w = 0.6 + 0.07 * max(len(l) for l in labels)   # inches: handle + text at the paper font size
        fits = max(1, int(fig.get_figwidth() // col_w))
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles), fits))


def positive_values(y: pd.Series) -> np.ndarray:
    """Values for a log axis: non-positive ones become NaN (a gap, never a fake point)."""
    y = pd.to_numeric(y, errors="coerce").to_numpy(float)
    return np.where(y > 0, y, np.nan)


def save_figure(fig: Figure, out, name: str, formats=("png",)) -> list:
    """Write ``fig`` as ``out/name.<fmt>`` for each format, atomically and without a timestamp.

    Args:
        fig: the figure (constrained layout: what is saved is whole).
        out: the folder (a ``pathlib.Path``).
        name: the file name without its suffix.
        formats: any of ``png``, ``pdf``, ``svg``.
    Returns:
        The paths written.
    """
    from gradflow.utils.io import atomic_write
    paths = []
    for fmt in formats:
        meta = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
        path = out / f"{name}.{fmt}"
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=200, metadata=meta))
        paths.append(path)
    return paths
