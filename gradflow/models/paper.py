"""The paper's variant sets, Tables 1-3, as one table (docs/theory.md, section 7).

Every other list of the paper's variants derives from :data:`ROWS`: the
trainer's presets (``table1-scale-0.5`` ...), the probe's ``--compare table1`` /
``table2`` sets and the figures of ``python -m gradflow figures``. A row is a
registered model, its ``create_model`` options and the test error the paper
reports for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from gradflow.errors import GradflowError, unknown


@dataclass(frozen=True)
class PaperRow:
    """One row of Tables 1-3: what to build and the CIFAR test error the paper reports.

    ``key`` names the row within its table (``scale-0.5``); ``label`` is the
    words figures and the probe use (``scale 0.5``). ``sweep`` marks the inner
    points of Table 1's gate-bias sweep, which the probe's compare set leaves
    out (it keeps b_g = 0 and -6, the paper's discussed values).
    """

    table: str
    key: str
    label: str
    model: str
    options: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    paper_error: str = ""
    sweep: bool = False
    missing: Optional[str] = None   # why the zoo cannot build it yet, if it cannot

    @property
    def name(self) -> str:
        """The preset name: ``table1-scale-0.5``."""
        return f"table{self.table}-{self.key}"

    def variant(self) -> dict[str, Any]:
        """The unit options alone (no ``num_classes``): what a compare set applies to any model."""
        return {k: v for k, v in self.options.items() if k != "num_classes"}


def _table1() -> list[PaperRow]:
    rows = [("original", "original", dict(shortcut="identity"), "6.61"),
            ("scale-0", "scale 0", dict(shortcut="scale", scale=0.0), "fail"),
            ("scale-0.5", "scale 0.5", dict(shortcut="scale", scale=0.5), "fail"),
            ("scale-0.5-0.5", "scale 0.5/0.5", dict(shortcut="scale", scale=0.5, scale_branch=True), "12.35"),
            ("conv-shortcut", "1x1 conv", dict(shortcut="conv"), "12.22"),
            ("dropout-shortcut", "dropout 0.5", dict(shortcut="dropout", dropout=0.5), "fail")]
    out = [PaperRow("1", k, lab, "resnet110", dict(unit="original", **o), paper_error=e) for k, lab, o, e in rows]
    for b in range(0, -8, -1):
        out.append(PaperRow("1", f"exclusive-gate-b{b}", f"exclusive gate b={b}", "resnet110",
                            dict(unit="original", shortcut="exclusive_gate", gate_bias=float(b)),
                            paper_error={-6: "8.70", -7: "9.81"}.get(b, "fail"), sweep=b not in (0, -6)))
    out += [PaperRow("1", "shortcut-gate-b0", "shortcut gate b=0", "resnet110",
                     dict(unit="original", shortcut="shortcut_gate", gate_bias=0.0), paper_error="12.86"),
            PaperRow("1", "shortcut-gate-b-6", "shortcut gate b=-6", "resnet110",
                     dict(unit="original", shortcut="shortcut_gate", gate_bias=-6.0), paper_error="6.91")]
    return out


TABLE2_ERRORS = {"original": ("6.61", "5.93"), "bn_after_addition": ("8.17", "6.50"),
                 "relu_before_addition": ("7.84", "6.14"), "relu_only_preact": ("6.71", "5.91"),
                 "full_preact": ("6.37", "5.46")}


def _table2() -> list[PaperRow]:
    return [PaperRow("2", f"{m}-{u}", u, m, dict(unit=u), paper_error=e[i])
            for i, m in enumerate(("resnet110", "resnet164")) for u, e in TABLE2_ERRORS.items()]


def _table3() -> list[PaperRow]:
    rows = [("cifar10", "resnet110", "6.61", "6.37"), ("cifar10", "resnet164", "5.93", "5.46"),
            ("cifar10", "resnet1001", "7.61", "4.92"), ("cifar100", "resnet164", "25.16", "24.33"),
            ("cifar100", "resnet1001", "27.82", "22.71")]
    out = []
    for ds, m, e_orig, e_pre in rows:
        for unit, err in (("original", e_orig), ("full_preact", e_pre)):
            tag = "original" if unit == "original" else "preact"
            out.append(PaperRow("3", f"{ds}-{m}-{tag}", f"{m} {tag}", m,
                                dict(unit=unit, num_classes=10 if ds == "cifar10" else 100),
                                dataset=ds, paper_error=err))
    why = "the zoo has no unit with 1-layer skips yet (one 3x3 conv per unit)"
    for unit, err in (("original", "9.90"), ("full_preact", "8.91")):
        tag = "original" if unit == "original" else "preact"
        out.append(PaperRow("3", f"cifar10-resnet110-1layer-{tag}", f"resnet110 1-layer {tag}", "resnet110",
                            dict(unit=unit), paper_error=err, missing=why))
    return out


def paper_rows(table: Optional[str] = None, model: Optional[str] = None, dataset: Optional[str] = None,
               runnable: bool = False) -> list[PaperRow]:
    """The rows of Tables 1-3 (built on call: no import-time globals), filtered.

    Args:
        table: "1", "2" or "3"; None for all.
        model: keep rows of this registered model only.
        dataset: "cifar10" or "cifar100".
        runnable: drop rows the zoo cannot build yet (``missing``).
    Returns:
        The rows, Table 1 then 2 then 3, in the paper's order.
    """
    if table is not None and str(table) not in ("1", "2", "3"):
        raise GradflowError(f"table={table!r} is not one of the paper's tables 1, 2, 3")
    rows = _table1() + _table2() + _table3()
    return [r for r in rows if (table is None or r.table == str(table)) and (model is None or r.model == model)
            and (dataset is None or r.dataset == dataset) and not (runnable and r.missing)]


def compare_set(name: str) -> dict[str, dict[str, Any]]:
    """The probe's named compare sets: label -> unit options, to apply to any zoo model.

    ``table1``: the shortcut variants of Table 1 (the gate-bias sweep at b_g = 0
    and -6); ``table2``: the five activation placements.
    """
    key = name.lower()
    if key == "table1":
        return {r.label: r.variant() for r in paper_rows("1") if not r.sweep}
    if key == "table2":
        return {r.label: dict(r.variant(), shortcut="identity") for r in paper_rows("2", "resnet110")}
    raise unknown("--compare set", name, COMPARE_SET_NAMES)


COMPARE_SET_NAMES = ("table1", "table2")
