"""The sweep's check of one network: gradflow's run-time units against the autograd oracle.

For a network and its inputs (the model in eval mode, so that every run is the
same forward):

1. every addition autograd finds residual (one operand computed from the other)
   is one gradflow lists (a depth unit, a sub-unit or a sum);
2. the traced forward's output equals the untraced one;
3. dE/dx_l at every depth unit equals the gradient autograd gives at that
   tensor (the shortcut operand of its addition, or the input of the module
   it happens in), kept with ``retain_grad``;
4. the direct term at every depth unit equals the gradient at x_l of the
   detached-branch network (the same forward with every unit's branch
   detached), or gradflow said why it is not there.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

import gradflow
from gradflow.utils.state import _attributes, _restore
import zoo_oracle as oracle


def _leaf(t: Any) -> Any:
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().requires_grad_()
    return t


def _weight(out: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def _close(got: Tensor, ref: Tensor, rtol: float, what: str) -> None:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def check_network(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                  out_of: Callable = lambda o: o, rtol: float = 1e-4, split: bool = True) -> dict:
    """Run checks 1-4 (see the module doc); returns what was checked, for the report."""
    kwargs = kwargs or {}
    model.eval()

    def call(m):    # fresh input leaves each run: a leaf's .grad would add up over the runs
        return out_of(m(*(_leaf(a) for a in args), **{k: _leaf(v) for k, v in kwargs.items()}))

    listed = gradflow.units(model, example=kwargs if kwargs else args, units="run")
    depth = [u for u in listed if u.role == "depth"]
    assert depth, "no depth unit found"
    owners = list({id(u.module): u.module for u in depth if u.site.fork == "input"}.values())
    seen = {u.site.entry for u in listed} | {u.site.exit for u in listed}

    fresh = _attributes(model)   # each run starts from the same model: caches a forward fills are undone
    tap, out_ref, inputs = oracle.run(model, call, _weight, inputs_of=owners, check=True)
    _restore(fresh)             # (timm's eval-mode attention-bias cache would hand over a freed graph)
    missing = [k for k, d in enumerate(tap.dependent) if d and k not in seen]
    assert not missing, (f"additions {missing} of {len(tap.adds)} are residual (autograd), not found; "
                         f"shapes {[tuple(tap.adds[k][0].shape) for k in missing[:4]]}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradflow.trace(model, units="run", keep=("grad", "direct"), split=split) as tr:
            out = call(model)
            (out * _weight(out)).sum().backward()
    torch.testing.assert_close(out.detach(), out_ref.detach(), rtol=0, atol=0)
    said = " ".join(str(w.message) for w in caught)
    assert [u.name for u in tr.infos] == [u.name for u in depth]

    def x_of(t, ins, u):
        s = u.site
        if s.fork == "input":
            return ins[(id(u.module), s.call)]
        a, b, inplace = t.adds[s.entry]
        return None if inplace and s.shortcut == 0 else (a, b)[s.shortcut]

    checked = 0
    for i, u in enumerate(tr.infos):
        x = x_of(tap, inputs, u)
        if x is None or x.grad is None:
            continue
        _close(tr.tensors[(0, i)]["grad"], x.grad, rtol, f"dE/dx at {u.name}")
        checked += 1
    assert checked >= len(tr.infos) - 1 or checked >= 0.9 * len(tr.infos), (checked, len(tr.infos))

    directs = 0
    if split:
        detach = {}
        for u in depth:
            s = u.site
            detach[s.exit] = 1 - s.exit_shortcut
            if s.entry != s.exit:
                detach[s.entry] = 1 - s.shortcut
        _restore(fresh)
        tap2, _, inputs2 = oracle.run(model, call, _weight, detach=detach, inputs_of=owners)
        for i, u in enumerate(tr.infos):
            kept = tr.tensors.get((0, i), {}).get("direct")
            x = x_of(tap2, inputs2, u)
            if kept is None:
                assert u.name in said or "direct" in said, f"no direct term at {u.name}, and nothing said"
                continue
            if x is None or x.grad is None:
                continue
            _close(kept, x.grad, rtol, f"direct term at {u.name}")
            directs += 1
    return dict(units=len(tr.infos), listed=len(listed), grads=checked, directs=directs)
