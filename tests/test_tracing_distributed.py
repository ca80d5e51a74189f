"""The tracer under a process group: 2 CPU processes (gloo) spawned by torch.multiprocessing.

Each case runs the same network under DDP or FSDP2 (``fully_shard``) with the global batch
split over the ranks, and rank 0's tables are checked against a plain single-process trace
of the concatenated batch, made here in the parent (no process group). Each rank's loss is
the mean over its own samples, so its dE/dx_l are ``world`` times the global-mean loss's
(autograd's numbers, recorded as they are): gradient norms are compared with that factor;
ratios, activations, weight-gradient norms (DDP and FSDP2 average the ranks' gradients)
and update ratios are compared as they are.
"""
import gc
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import gradflow

WORLD = 2
GRAD = ("grad_norm", "direct_norm", "residual_norm")          # proportional to the loss's scale
SAME = ("x_norm", "x_mean", "h_norm", "r_norm", "grad_ratio", "direct_ratio", "ref_ratio",
        "cos_direct_residual")


class LNUnit(nn.Module):
    """x + fc(tanh(LN(x))): per-sample statistics independent of the other samples."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.ln(x)))


class SyncBN1d(nn.BatchNorm1d):
    """Batch statistics over every rank's samples (torch's SyncBatchNorm runs on GPUs only):
    sums all-reduced with the differentiable collective, as SyncBatchNorm does on CUDA."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce   # differentiable
        n = all_reduce(torch.tensor([float(x.shape[0])]))
        mean = all_reduce(x.sum(0)) / n
        var = all_reduce(((x - mean) ** 2).sum(0)) / n
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class BNUnit(nn.Module):
    """x + fc(relu(BN(x))), its branch declared (torch.fx cannot read the collectives in SyncBN1d)."""

    def __init__(self, d, bn):
        super().__init__()
        self.branch = nn.Sequential(bn(d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, x):
        return x + self.branch(x)


def parts(bn):
    return {"branch": "branch"} if bn else None


class Net(nn.Module):
    def __init__(self, depth=3, d=8, unit=LNUnit, bn=None):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.blocks = nn.ModuleList([unit(d) if bn is None else unit(d, bn) for _ in range(depth)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make(depth=3, bn=None):
    torch.manual_seed(0)
    return Net(depth, unit=BNUnit if bn else LNUnit, bn=bn)


def batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


def run_steps(model, xs, ys, opt, steps=2):
    for _ in range(steps):
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()


def reference(depth=3, bn=None, steps=2, dtype=torch.float32):
    m = make(depth, nn.BatchNorm1d if bn else None).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = batch()
    x = x.to(dtype)
    with gradflow.trace(m, units="blocks.*", parts=parts(bn), optimizer=opt) as tr:
        run_steps(m, x, y, opt, steps)
    return tr.units, tr.samples


# -- the ranks' side --------------------------------------------------------------------------

def _entry(rank, port, case, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        globals()[case](rank, out, *args)
        gc.collect()        # a DDP reducer freed after the group is gone aborts the process
        dist.barrier()      # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def spawn(case, tmp_path, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(port, case, str(tmp_path), args), nprocs=WORLD)


def _traced(rank, out, wrap, depth=3, bn=False, steps=2, dtype=torch.float32):
    m = make(depth, SyncBN1d if bn else None).to(dtype)
    if wrap == "ddp":
        runner = nn.parallel.DistributedDataParallel(m)
    else:
        from torch.distributed.fsdp import fully_shard
        for b in m.blocks:
            fully_shard(b)
        runner = fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = batch()
    xs, ys = x.to(dtype).chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    with gradflow.trace(m, units="blocks.*", parts=parts(bn), optimizer=opt) as tr:
        run_steps(runner, xs, ys, opt, steps)
    if wrap == "fsdp":      # Spectra runs units outside FSDP's all-gathers: refused at attach, by name
        from gradflow.errors import GradflowError
        with pytest.raises(GradflowError, match="Spectra quantity .* under FSDP"):
            gradflow.trace(m, units="blocks.*", quantities=("full",)).attach()
    if rank == 0:
        tr.units.to_pickle(os.path.join(out, "units.pkl"))
        tr.samples.to_pickle(os.path.join(out, "samples.pkl"))


def check(tmp_path, depth=3, bn=False, dtype=torch.float32):
    units, samples = (pd.read_pickle(tmp_path / f"{n}.pkl") for n in ("units", "samples"))
    ref_u, ref_s = reference(depth, bn, dtype=dtype)
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (1e-11, 1e-14)
    assert list(samples["rank"]) == [int(s >= 6) for s in samples["sample"]]
    assert samples[["step", "unit", "sample"]].equals(ref_s[["step", "unit", "sample"]])
    for c in SAME:
        np.testing.assert_allclose(samples[c], ref_s[c], rtol=rtol, atol=atol, err_msg=c)
    for c in GRAD:
        np.testing.assert_allclose(samples[c], WORLD * ref_s[c], rtol=rtol, atol=atol, err_msg=c)
    assert (units["batch"] == 12).all()
    for c in ("x_norm_q50", "grad_ratio_std", "weight_grad_norm", "update_ratio"):
        np.testing.assert_allclose(units[c], ref_u[c], rtol=rtol, err_msg=c)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_a_layernorm_net_under_ddp_and_fsdp2_gives_the_single_process_table_of_the_global_batch(wrap, tmp_path):
    spawn("_traced", tmp_path, wrap)
    check(tmp_path)


@pytest.mark.slow
def test_a_float64_net_under_ddp_keeps_float64_in_the_gathered_table(tmp_path):
    """A closed-form check runs in float64: the gather must not round it to float32 on the way."""
    spawn("_traced", tmp_path, "ddp", 3, False, 2, torch.float64)
    check(tmp_path, dtype=torch.float64)


@pytest.mark.slow
def test_a_batchnorm_net_with_synchronised_statistics_gives_the_global_batch_table(tmp_path):
    spawn("_traced", tmp_path, "ddp", 3, True)
    check(tmp_path, bn=True)


COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "gather",
               "all_reduce", "reduce", "broadcast", "broadcast_object_list", "reduce_scatter_tensor")


def _count_calls(counts):
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            def counted(*a, _fn=fn, **k):
                counts[0] += 1
                return _fn(*a, **k)
            setattr(dist, name, counted)


def _mechanics(rank, out):
    from gradflow.errors import GradflowError
    from gradflow.tracing import CSVSink, FunctionSink
    counts = [0]
    _count_calls(counts)
    x, y = batch()
    xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    per_step = {}
    for depth in (2, 6):     # the tracer's collectives per recorded step: the traced count less the plain one
        for traced in (False, True):
            m = make(depth)
            runner = nn.parallel.DistributedDataParallel(m)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            tr = gradflow.trace(m, units="blocks.*", optimizer=opt) if traced else None
            got = []
            with tr if tr is not None else _Null():
                for _ in range(3):
                    before = counts[0]
                    run_steps(runner, xs, ys, opt, 1)
                    got.append(counts[0] - before)
            per_step[(depth, traced)] = got
    extra = {d: [a - b for a, b in zip(per_step[(d, True)], per_step[(d, False)])] for d in (2, 6)}
    # without an optimizer (the trainer's probes): weight norms after DDP has averaged the gradients
    m = make(3)
    runner = nn.parallel.DistributedDataParallel(m)
    rows = []
    with gradflow.trace(m, units="blocks.*", history=0,
                        sinks=[CSVSink(os.path.join(out, "units.csv")),
                               CSVSink(os.path.join(out, "samples.csv"), samples=True, per_rank=True),
                               FunctionSink(lambda u, s: rows.append(len(u)))]) as tr:
        F.cross_entropy(runner(xs), ys).backward()
    kept = len(tr.units)
    m = make(3)
    runner = nn.parallel.DistributedDataParallel(m)
    with gradflow.trace(m, units="blocks.*") as tr:
        F.cross_entropy(runner(xs), ys).backward()
    if rank == 1:
        tr.units.to_pickle(os.path.join(out, "units_rank1.pkl"))
    # uneven slices (7 and 5 samples): the buffers are padded to a length the ranks agree on
    m = make(3)
    runner = nn.parallel.DistributedDataParallel(m)
    mine = slice(0, 7) if rank == 0 else slice(7, 12)
    with gradflow.trace(m, units="blocks.*") as tr:
        F.cross_entropy(runner(x[mine]), y[mine]).backward()
    if rank == 0:
        tr.samples.to_pickle(os.path.join(out, "uneven.pkl"))
    refused = None
    try:
        gradflow.trace(make(2), units="blocks.*", paths=True).attach()
    except GradflowError as e:
        refused = str(e)
    pd.to_pickle(dict(extra=extra, rows=rows, kept=kept, refused=refused), os.path.join(out, f"r{rank}.pkl"))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


@pytest.mark.slow
def test_one_collective_per_recorded_step_whatever_the_depth_and_sinks_write_once(tmp_path):
    spawn("_mechanics", tmp_path)
    r0, r1 = (pd.read_pickle(tmp_path / f"r{r}.pkl") for r in range(WORLD))
    for r in (r0, r1):
        # the first step agrees on the buffers' length (a second round); then one per step, at any depth
        assert r["extra"] == {2: [2, 1, 1], 6: [2, 1, 1]}
        assert r["kept"] == 0                            # history=0: nothing kept, on any rank
        assert "paths=" in r["refused"] and "process group" in r["refused"]
    assert r0["rows"] == [4] and r1["rows"] == []      # a plain sink writes on rank 0 only
    units = pd.read_csv(tmp_path / "units.csv")
    assert len(units) == 4 and (units["batch"] == 12).all()
    ref_u, _ = _reference_no_opt()
    np.testing.assert_allclose(units["weight_grad_norm"], ref_u["weight_grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(units["x_norm"], ref_u["x_norm"], rtol=1e-5)
    for r in range(WORLD):                            # per_rank: each rank its own samples, its own file
        s = pd.read_csv(tmp_path / f"samples.rank{r}.csv")
        assert (s["rank"] == r).all() and len(s) == 4 * 6
    # every rank holds the joined tables (history=None)
    uneven, (_, ref_s) = pd.read_pickle(tmp_path / "uneven.pkl"), _reference_no_opt()
    assert uneven[uneven["unit"] == 0]["rank"].tolist() == [0] * 7 + [1] * 5
    for c in ("x_norm", "grad_ratio", "direct_ratio"):
        np.testing.assert_allclose(uneven[c], ref_s[c], rtol=1e-5, err_msg=c)
    held = pd.read_pickle(tmp_path / "units_rank1.pkl")
    for c in ("x_norm", "grad_norm_q95", "weight_grad_norm"):
        np.testing.assert_allclose(held[c], units[c], rtol=1e-5, err_msg=c)


def _reference_no_opt():
    m = make(3)
    x, y = batch()
    with gradflow.trace(m, units="blocks.*") as tr:
        F.cross_entropy(m(x), y).backward()
    return tr.units, tr.samples


# -- the Lightning callback under its DDP strategy ------------------------------------------------

def _lightning_entry(rank, port, out):
    """A rank as torchrun starts it: Lightning reads the environment and joins the group itself."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0",
                      TORCHELASTIC_RUN_ID="gradflow-test", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import contextlib
    import io
    import lightning.pytorch as pl
    from gradflow.integrations.lightning import GradflowCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make(3)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = batch(8)   # each rank its own half, two samples a step
    half = slice(4 * rank, 4 * rank + 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[half], y[half]), batch_size=2)
    cb = GradflowCallback(units="net.blocks.*")
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         accelerator="cpu", devices=WORLD, strategy="ddp", use_distributed_sampler=False)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        trainer.fit(Module(), loader)
    if rank == 0:
        pd.to_pickle(dict(samples=cb.tracer.samples, said=said.getvalue()), os.path.join(out, "lightning.pkl"))


@pytest.mark.slow
def test_the_lightning_callback_under_ddp_records_the_global_batch_and_says_so(tmp_path):
    pytest.importorskip("lightning.pytorch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lightning_entry, args=(port, str(tmp_path)), nprocs=WORLD)
    got = pd.read_pickle(tmp_path / "lightning.pkl")
    assert got["said"].count("the tables hold the global batch") == 1
    s = got["samples"]
    s0 = s[s["step"] == 0]
    assert sorted(set(s0["sample"])) == [0, 1, 2, 3] and list(s0[s0["unit"] == 0]["rank"]) == [0, 0, 1, 1]
    x, y = batch(8)
    order = [0, 1, 4, 5]     # step 0: rank 0's first two samples, then rank 1's
    ref = make(3)
    with gradflow.trace(ref, units="blocks.*") as tr:
        F.cross_entropy(ref(x[order]), y[order]).backward()
    want = tr.samples
    for c in ("x_norm", "grad_ratio", "direct_ratio"):
        np.testing.assert_allclose(s0[c], want[c], rtol=1e-5, err_msg=c)
    assert len(pd.read_csv(tmp_path / "gradflow.csv")) == 2 * 4    # rank 0's file: 2 steps x 4 rows


HF_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import pandas as pd, torch, torch.distributed as dist, transformers
from test_sinks import HFModel, DictDataset, hf_args, data
from gradflow.integrations.hf import GradflowTrainerCallback
x, y = data(n=16)
cb = GradflowTrainerCallback(units="net.blocks.*")
trainer = transformers.Trainer(model=HFModel(), args=hf_args(transformers, {out!r}),
                               train_dataset=DictDataset(x, y), callbacks=[cb])
trainer.train()
cb.tracer.samples.to_pickle({out!r} + f"/samples{{dist.get_rank()}}.pkl")
"""


@pytest.mark.slow
def test_the_hugging_face_callback_under_torchrun_records_the_global_batch_and_says_so(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import subprocess
    import sys
    script = tmp_path / "hf_ddp.py"
    script.write_text(HF_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(gradflow.__file__))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                          "--standalone", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("the tables hold the global batch") == 1     # rank 0 says it, once
    for r in range(WORLD):      # every rank holds the joined table: 2 samples from each rank per micro-batch
        s = pd.read_pickle(tmp_path / f"samples{r}.pkl")
        ranks = s.groupby(["step", "micro", "unit"])["rank"].apply(lambda r: tuple(sorted(r)))
        assert len(ranks) == 2 * 2 * 4 and all(v == (0, 0, 1, 1) for v in ranks)
    written = pd.read_csv(tmp_path / "gradflow.csv")                    # by rank 0 alone
    assert len(written) == 2 * 2 * 4 and (written["batch"] == 4).all()
