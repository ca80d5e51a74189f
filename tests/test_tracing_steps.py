"""The tracer inside real training loops: every pattern against plain autograd.

A step is one optimizer update when the tracer has the optimizer; each forward inside
it is a micro-batch. Each test runs the same computation untraced on a copy of the
model and compares the recorded per-sample numbers with autograd's.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from tracing_helpers import ResMLP, grads_at_inputs, per_sample_norm


def data(n=4, d=8, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def model(seed=0):
    torch.manual_seed(seed)
    return ResMLP()


def rows(tr, **where):
    s = tr.samples
    for k, v in where.items():
        s = s[s[k] == v]
    return s.sort_values(["unit", "sample"])


def check(tr, grads, column="grad_norm", rtol=1e-5, **where):
    s = rows(tr, **where)
    for i, g in enumerate(grads):
        got = s.loc[s["unit"] == i, column].to_numpy()
        np.testing.assert_allclose(got, per_sample_norm(g).numpy(), rtol=rtol, atol=1e-9,
                                   err_msg=f"{column} at unit {i} {where}")


def no_gradflow_warnings(w):
    assert not [x for x in w if "gradflow" in str(x.message)], [str(x.message) for x in w]


@pytest.mark.parametrize("one_backward", [True, False])
def test_gradient_accumulation_micro_batches_and_weight_quantities(one_backward):
    m = model()
    ref = copy.deepcopy(m)
    (x1, y1), (x2, y2) = data(seed=1), data(seed=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    blocks = list(ref.blocks)

    def losses(net):
        return F.cross_entropy(net(x1), y1) / 2, F.cross_entropy(net(x2), y2) / 2
    ts, g = grads_at_inputs(blocks, lambda: sum(losses(ref)))     # 3 + 3 inputs, then x_L of each
    sum(losses(ref)).backward()                                   # the weight gradients of the step
    with warnings.catch_warnings(record=True) as w, gradflow.trace(m, optimizer=opt) as tr:
        warnings.simplefilter("always")
        a, b = losses(m)
        if one_backward:
            (a + b).backward()
        else:
            a.backward()
            b.backward()
        opt.step()
        opt.zero_grad()
    no_gradflow_warnings(w)
    df = tr.units
    assert set(df["step"]) == {0} and set(df["micro"]) == {0, 1}
    check(tr, g[0:3] + [g[6]], micro=0)
    check(tr, g[3:6] + [g[7]], micro=1)
    # identity shortcuts: the direct term is dE/dx_L in each micro-batch (eq. 5)
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)
    body = df[~df["is_top"] & (df["micro"] == 0)].sort_values("unit")
    for i, blk in enumerate(blocks):
        gn = torch.cat([p.grad.flatten() for p in blk.parameters()]).norm().item()
        w0 = torch.cat([p.detach().flatten() for p in blk.parameters()]).norm().item()
        assert body["weight_grad_norm"].iloc[i] == pytest.approx(gn, rel=1e-5)
        assert body["update_ratio"].iloc[i] == pytest.approx(0.1 * gn / w0, rel=1e-4)   # SGD: lr * g


def test_retain_graph_and_a_second_backward_each_get_rows():
    m = model()
    ref = copy.deepcopy(m)
    x, y = data()
    blocks = list(ref.blocks)
    out = {}

    def loss1():
        out["o"] = ref(x)
        return F.cross_entropy(out["o"], y)
    _, g1 = grads_at_inputs(blocks, loss1)
    _, g2 = grads_at_inputs(blocks, lambda: ref(x).square().mean())
    with gradflow.trace(m) as tr:
        o = m(x)
        F.cross_entropy(o, y).backward(retain_graph=True)
        o.square().mean().backward()
    assert set(tr.units["backward"]) == {0, 1}
    check(tr, g1, backward=0)
    check(tr, g2, backward=1)
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_reading_tables_mid_step_loses_nothing(with_optimizer):
    m = model()
    ref = copy.deepcopy(m)
    x, y = data()
    _, g = grads_at_inputs(list(ref.blocks), lambda: F.cross_entropy(ref(x), y))
    opt = torch.optim.SGD(m.parameters(), lr=0.1) if with_optimizer else None
    with gradflow.trace(m, optimizer=opt) as tr:
        loss = F.cross_entropy(m(x), y)
        assert tr.units.empty                   # nothing complete yet; reading closes nothing
        loss.backward()
        if not with_optimizer:
            check(tr, g)                        # complete rows, readable before the step ends
        else:
            assert tr.units.empty               # a step is the optimizer's update
            opt.step()
    check(tr, g)
    assert len(tr.units) == len(g)


def test_amp_grad_scaler_unscaled_and_skipped_steps_marked():
    m = model()
    ref = copy.deepcopy(m)
    x, y = data()
    _, g = grads_at_inputs(list(ref.blocks), lambda: F.cross_entropy(ref(x), y))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    with gradflow.trace(m, optimizer=opt, scaler=scaler) as tr:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            scaler.scale(F.cross_entropy(m(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        with pytest.warns(RuntimeWarning, match="skipped"):
            bad = x.clone()
            bad[0, 0] = float("inf")
            scaler.scale(F.cross_entropy(m(bad), y)).backward()
            scaler.step(opt)
            scaler.update()
    check(tr, g, step=0)                         # the loss scale (1024) is taken out
    df = tr.units
    assert not df.loc[df["step"] == 0, "skipped"].any() and df.loc[df["step"] == 1, "skipped"].all()


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_no_grad_evaluation_between_steps_is_its_own_rows(no_grad):
    m = model()
    ref = copy.deepcopy(m)
    x, y = data()
    xe, _ = data(seed=5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    blocks = list(ref.blocks)
    _, g0 = grads_at_inputs(blocks, lambda: F.cross_entropy(ref(x), y))
    F.cross_entropy(ref(x), y).backward()
    ropt.step()
    ropt.zero_grad()
    with torch.no_grad():
        xs_eval, _ = [], None
        hs = [b.register_forward_pre_hook(lambda mod, a: xs_eval.append(a[0])) for b in blocks]
        ref(xe)
        for h in hs:
            h.remove()
    _, g1 = grads_at_inputs(blocks, lambda: F.cross_entropy(ref(x), y))
    with warnings.catch_warnings(record=True) as w, gradflow.trace(m, optimizer=opt) as tr:
        warnings.simplefilter("always")
        for step in range(2):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            if step == 0:
                with no_grad():
                    m(xe)
    no_gradflow_warnings(w)
    check(tr, g0, step=0, phase="train")
    check(tr, g1, step=1, phase="train")
    check(tr, xs_eval, column="x_norm", phase="eval")
    ev = tr.units[tr.units["phase"] == "eval"]
    assert set(ev["step"]) == {1} and ev["grad_norm"].isna().all()


def test_what_cannot_be_recorded_is_said_once():
    m = model()
    x, y = data()
    with pytest.warns(RuntimeWarning, match="no backward pass reached") as w:
        with gradflow.trace(m) as tr:
            m(x)
            m(x)
    assert sum("no backward" in str(r.message) for r in w) == 1
    assert tr.units["grad_norm"].isna().all() if "grad_norm" in tr.units else True
    # a backward from an intermediate output reaches only the units before it
    with pytest.warns(RuntimeWarning, match=r"did not reach unit\(s\) 2 \(blocks.2\): the loss does not depend") as w:
        with gradflow.trace(m) as tr:
            mid = []
            hook = m.blocks[0].register_forward_hook(lambda mod, a, o: mid.append(o))
            m(x)
            hook.remove()
            mid[-1].sum().backward()
    # the hook also saw the discovery forward (units found at run time), and that is said
    assert len(mid) == 2
    assert sum("runs the forward hooks on 1 module(s) (blocks.0)" in str(r.message) for r in w) == 1
    # a second backward through a graph whose rows were already written
    with pytest.warns(RuntimeWarning, match="after its rows were written"):
        with gradflow.trace(m) as tr:
            out = m(x)
            out.sum().backward(retain_graph=True)
            m(x)
            out.sum().backward()


def test_nested_traces_of_the_same_model_are_refused():
    m = model()
    with gradflow.trace(m):
        with pytest.raises(gradflow.GradflowError, match="already traced"):
            gradflow.trace(m).attach()
        with pytest.raises(gradflow.GradflowError, match="nested traces"):
            with gradflow.trace(m.blocks[1], units=[m.blocks[1]]):   # a unit of the traced model
                pass
    assert "forward" not in m.blocks[1].__dict__
    with gradflow.trace(m):        # after the outer one ends, a new one is fine
        pass


def test_weight_grad_norm_without_an_optimizer():
    m = model()
    x, y = data()
    with gradflow.trace(m) as tr:
        F.cross_entropy(m(x), y).backward()
    body = tr.units[~tr.units["is_top"]].sort_values("unit")
    for i, blk in enumerate(m.blocks):
        gn = torch.cat([p.grad.flatten() for p in blk.parameters()]).norm().item()
        assert body["weight_grad_norm"].iloc[i] == pytest.approx(gn, rel=1e-5)
    assert "update_ratio" not in body or body["update_ratio"].isna().all()


class _Checkpointed(torch.nn.Module):
    """ResMLP whose blocks run under torch.utils.checkpoint (activation checkpointing)."""

    def __init__(self, net, reentrant):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = self.net.inp(x)
        for b in self.net.blocks:
            h = checkpoint(b, h, use_reentrant=self.reentrant)
        return self.net.head(h)


def test_activation_checkpointing_non_reentrant_is_recorded_exactly():
    """The re-run inside the backward adds no rows; gradients and the split are the plain ones."""
    m = model()
    x, y = data()
    ts, grads = grads_at_inputs(list(m.blocks), lambda: F.cross_entropy(m(x), y))
    plain = gradflow.trace(copy.deepcopy(m), units="blocks.*")
    with plain:
        F.cross_entropy(plain.model(x), y).backward()
    ck = _Checkpointed(m, reentrant=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with gradflow.trace(ck, units="net.blocks.*") as tr:
            F.cross_entropy(ck(x), y).backward()
    no_gradflow_warnings(w)
    assert len(tr.units) == len(m.blocks) + 1
    check(tr, grads)
    for c in ("direct_norm", "residual_norm", "x_norm"):
        np.testing.assert_allclose(tr.samples[c], plain.samples[c], rtol=1e-5)


def test_activation_checkpointing_reentrant_says_what_it_cannot_record():
    """use_reentrant=True runs the forward under no_grad: x_l is recorded, dE/dx_l cannot be, said once."""
    m = model()
    x, y = data()
    ts, _ = grads_at_inputs(list(m.blocks), lambda: F.cross_entropy(m(x), y))
    ck = _Checkpointed(m, reentrant=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with gradflow.trace(ck, units="net.blocks.*") as tr:
            F.cross_entropy(ck(x), y).backward()
    said = [str(i.message) for i in w if "gradflow" in str(i.message)]
    assert len(said) == 1 and "use_reentrant=False" in said[0], said
    assert len(tr.units) == len(m.blocks) + 1            # the re-runs add no rows
    check(tr, ts[:-1], column="x_norm")
    assert tr.units["grad_norm"].isna().all()


def test_an_evaluation_forward_keeps_no_unit_input_alive():
    """The tracer holds no activation of a no_grad forward once it returns (only reductions)."""
    import gc
    import weakref
    m = model()
    x, _ = data()
    refs = []
    hs = [b.register_forward_pre_hook(lambda mod, a: refs.append(weakref.ref(a[0]))) for b in m.blocks]
    with gradflow.trace(m) as tr, torch.no_grad():
        m(x)
        gc.collect()
        assert [r() is None for r in refs[:-1]] == [True] * (len(refs) - 1)   # the last one feeds x_L
        assert len(tr.units) == len(m.blocks) + 1
    for h in hs:
        h.remove()


@pytest.mark.parametrize("split", [False, True])
def test_a_written_step_leaves_no_reference_cycle(split):
    """A step's records are freed when its rows are written, not at gc's next full pass.

    Cycles per step pile up until Python's full collection, which walks every object of
    the process (a model with thousands of modules: about 0.1 s on resnet1001, every
    few steps); gc.DEBUG_SAVEALL keeps what a collection would free, to look at it.
    """
    import gc
    from gradflow.tracing.records import Call, Micro
    m = model()
    x, y = data()
    with gradflow.trace(m, split=split, history=1) as tr:
        F.cross_entropy(m(x), y).backward()
        gc.collect()
        was = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                F.cross_entropy(m(x), y).backward()
            tr.units
            gc.collect()
            cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, (Call, Micro))]
        finally:
            gc.set_debug(was)
            gc.garbage.clear()
    assert cyclic == []


def test_units_called_outside_the_model_forward_get_dE_dx_L_at_the_last_one():
    """dE/dx_L is hooked when the model's forward ends; units run by hand, never through the
    model's forward, move it along to the last unit called. Both against autograd."""
    m = model()
    ref = copy.deepcopy(m)
    x, y = data()

    def by_hand(net):
        h = net.inp(x)
        for b in net.blocks:
            h = b(h)
        return F.cross_entropy(net.head(h), y)
    ts, g = grads_at_inputs(list(ref.blocks), lambda: by_hand(ref))
    with gradflow.trace(m, units="blocks.*", split=True) as tr:
        by_hand(m).backward()
    check(tr, g)
    top = per_sample_norm(g[-1]).numpy()
    body = rows(tr)
    for i, gi in enumerate(g[:-1]):
        got = body.loc[body["unit"] == i, "grad_ratio"].to_numpy()
        np.testing.assert_allclose(got, per_sample_norm(gi).numpy() / top, rtol=1e-5)
    # identity shortcuts: the direct term carried from the last unit's output is dE/dx_L (eq. 5)
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)


def test_a_re_attached_trace_measures_each_unit_once_and_runs_the_model_as_it_is_now():
    """Attach, detach, attach again (a callback per fit, a probe every N steps): each step's
    weight quantities cover each unit once, not once per attach; and a unit whose branch was
    replaced, between two attaches or while attached, runs its new branch, as the untraced
    model does."""
    from gradflow.tracing import Quantity

    class Seen(Quantity):      # how many units the weight quantities see per step
        scalars = ("seen",)
        needs = "weights"

        def __init__(self):
            self.n = []

        def weights_all(self, ts):
            self.n.append(len(ts))
            return [{"seen": torch.tensor(1.0)} for _ in ts]

    torch.manual_seed(0)
    m = gradflow.create_model("resnet20")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
    def new_branch(unit):
        unit.branch = copy.deepcopy(unit.branch)
        with torch.no_grad():
            for p in unit.branch.parameters():
                p.mul_(-2.0)

    seen = Seen()
    tr = gradflow.trace(m, quantities=[seen])
    for k in range(3):
        if k == 1:      # a lesion between two attaches: the first unit's branch is replaced
            new_branch(m.units()[0])
        ref = copy.deepcopy(m)           # untraced, as the model is now
        with tr:
            got = m(x)
            F.cross_entropy(got, y).backward()
            torch.testing.assert_close(got, ref(x))
            if k == 2:  # and one replaced while the trace is attached
                new_branch(m.units()[1])
                new_branch(ref.units()[1])
                got = m(x)
                F.cross_entropy(got, y).backward()
                torch.testing.assert_close(got, ref(x))
    assert seen.n == [len(m.units())] * 4        # four steps, each unit once in each


class _Unreadable(torch.nn.Module):
    """x + f(x) behind data-dependent control flow: torch.fx cannot read it, so no parts."""

    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > -1e30:
            return x + torch.tanh(self.fc(x))
        return x


def test_a_unit_without_parts_measures_the_weights_it_has_now():
    """A unit known only by input and output, whose child is replaced while the trace is
    attached: the next step's weight gradient norm is that of its new parameters (autograd)."""
    torch.manual_seed(0)
    m = ResMLP(block=_Unreadable)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "no split" for these units is said, once
        with gradflow.trace(m, units="blocks.*") as tr:
            F.cross_entropy(m(x), y).backward()
            m.zero_grad()
            m.blocks[0].fc = torch.nn.Linear(8, 8)
            F.cross_entropy(m(x), y).backward()
            want = torch.cat([p.grad.flatten() for p in m.blocks[0].parameters()]).norm().item()
    assert not any(i.split for i in tr.infos)
    df = tr.units
    got = df[(df["step"] == df["step"].max()) & (df["unit"] == 0)]["weight_grad_norm"].item()
    assert got == pytest.approx(want, rel=1e-5)


def test_a_torch_without_the_graph_task_id_says_checkpointing_goes_unrecognised(monkeypatch):
    import gradflow.tracing.recorder as rec
    monkeypatch.setattr(rec, "_GRAPH_TASK", None)
    monkeypatch.setattr(rec, "_GRAPH_TASK_SAID", False)
    m = gradflow.create_model("resnet20")
    with pytest.warns(RuntimeWarning, match="cannot tell a unit re-run by activation checkpointing") as w:
        with gradflow.trace(m) as tr:
            m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert sum("activation checkpointing" in str(x.message) for x in w) == 1     # once, not per unit
    assert tr.units["grad_norm"].notna().all()
