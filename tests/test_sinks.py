"""Sinks stream each step's rows (CSV, JSONL, TensorBoard) and the trainer callbacks.

Each check reads back what was written and compares it with the tracer's own table,
whose numbers the other tracing tests check against autograd; the callback tests
check the recorded dE/dx_l of the first step against plain autograd.
"""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.tracing import CSVSink, JSONLSink, TensorBoardSink
from tracing_helpers import ResMLP, grads_at_inputs, per_sample_norm


def data(n=4, d=8, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def train(m, steps, **kw):
    x, y = data()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with gradflow.trace(m, optimizer=opt, **kw) as tr:
        for _ in range(steps):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    return tr


def test_csv_and_jsonl_sinks_hold_every_row_with_bounded_memory(tmp_path):
    torch.manual_seed(0)
    full = train(ResMLP(), 3)
    torch.manual_seed(0)
    csv_s, jl_s = CSVSink(tmp_path / "u.csv"), JSONLSink(tmp_path / "s.jsonl", samples=True)
    tr = train(ResMLP(), 3, sinks=[csv_s, jl_s], history=0)
    assert tr.units.empty                                   # nothing kept in memory
    got = pd.read_csv(tmp_path / "u.csv")
    want = full.units
    assert set(want.columns) <= set(got.columns) and len(got) == len(want) == 3 * 4
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-12)
    np.testing.assert_allclose(got["update_ratio"].dropna(), want["update_ratio"].dropna(), rtol=1e-5)
    lines = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == len(full.samples)
    np.testing.assert_allclose([r["grad_norm"] for r in lines], full.samples["grad_norm"], rtol=1e-12)
    # appending to an existing file keeps its header
    with pytest.warns(RuntimeWarning, match="no column for \\['run'\\]"):
        train(ResMLP(), 1, sinks=[CSVSink(tmp_path / "u.csv", append=True, extra={"run": "b"})])
    assert len(pd.read_csv(tmp_path / "u.csv")) == 4 * 4


def test_tensorboard_sink_scalars_by_stage_and_depth_profiles(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    torch.manual_seed(0)
    tr = train(ResMLP(), 2, sinks=[TensorBoardSink(log_dir=str(tmp_path))])
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    df = tr.units
    for _, row in df.iterrows():
        tag = f"gradflow/grad_ratio.stage{row['stage']}/{row['name']}"
        ev = [e for e in acc.Scalars(tag) if e.step == row["step"]]
        assert ev and ev[0].value == pytest.approx(row["grad_ratio"], rel=1e-6)
    assert "gradflow/weight_grad_norm.stage0/blocks.1" in tags["scalars"]
    hist = acc.Histograms("gradflow/grad_ratio/over_depth")
    assert [h.step for h in hist] == [0, 1]
    counts = hist[1].histogram_value.bucket
    np.testing.assert_allclose(counts, df[df["step"] == 1].sort_values("unit")["grad_ratio"], rtol=1e-6)


# --- trainer callbacks: a few steps each, tiny models, no downloads ------------------------------

def grad_ratios(model, x, y):
    """||dE/dx_l|| / ||dE/dx_L|| per unit (trainers scale the loss for accumulation; ratios don't care)."""
    ref = copy.deepcopy(model)
    _, g = grads_at_inputs(list(ref.blocks), lambda: F.cross_entropy(ref(x), y))
    top = per_sample_norm(g[-1])
    return [per_sample_norm(gi) / top for gi in g[:-1]]


def check_ratios(samples, want):
    for i, w in enumerate(want):
        np.testing.assert_allclose(samples.loc[samples["unit"] == i, "grad_ratio"], w, rtol=1e-4)


def test_lightning_callback_records_each_optimizer_step(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradflow.integrations.lightning import GradflowCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = ResMLP()

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = data(n=8)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    mod = Module()
    want = grad_ratios(mod.net, x[:4], y[:4])
    cb = GradflowCallback(units="net.blocks.*")
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu", limit_val_batches=1,
                         val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(mod, loader, loader)
    df = cb.tracer.units
    train_rows = df[df["phase"] == "train"]
    assert sorted(train_rows["step"].unique()) == [0, 1, 2] and set(train_rows["micro"]) == {0, 1}
    assert (df["phase"] == "eval").any()
    s = cb.tracer.samples
    check_ratios(s[(s["step"] == 0) & (s["micro"] == 0) & (s["phase"] == "train")].sort_values(["unit", "sample"]),
                 want)
    assert len(pd.read_csv(tmp_path / "gradflow.csv")) == len(df)    # no logger: the CSV default
    assert all("forward" not in m.__dict__ for m in mod.modules())


class HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = ResMLP()
        self.blocks = self.net.blocks

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    """Hugging Face's input format: one dict per sample."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_args(transformers, out):
    """Two optimizer steps of two micro-batches of 2 samples, plain SGD, on the CPU, nothing else."""
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=0.05, report_to=[], use_cpu=True, remove_unused_columns=False,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        optim="sgd", lr_scheduler_type="constant", seed=0, data_seed=0)


def test_hf_trainer_callback_records_each_optimizer_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradflow.integrations.hf import GradflowTrainerCallback

    x, y = data(n=8)
    model = HFModel()
    ref = copy.deepcopy(model.net)
    cb = GradflowTrainerCallback(units="net.blocks.*")
    trainer = transformers.Trainer(model=model, args=hf_args(transformers, tmp_path),
                                   train_dataset=DictDataset(x, y), callbacks=[cb])
    trainer.train()
    df = cb.tracer.units
    assert sorted(df["step"].unique()) == [0, 1] and set(df["micro"]) == {0, 1}
    written = pd.read_csv(tmp_path / "gradflow.csv")
    assert len(written) == len(df)
    # the first micro-batch holds two of the eight (shuffled) samples: find them by ||x_0||
    s = cb.tracer.samples
    s = s[(s["step"] == 0) & (s["micro"] == 0)].sort_values(["unit", "sample"])
    with torch.no_grad():
        all_norms = ref.inp(x).norm(dim=1).numpy()
    idx = [int(np.argmin(np.abs(all_norms - v))) for v in s[s["unit"] == 0]["x_norm"]]
    np.testing.assert_allclose(all_norms[idx], s[s["unit"] == 0]["x_norm"], rtol=1e-5)
    check_ratios(s, grad_ratios(ref, x[idx], y[idx]))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_hf_trainer_callback_detaches_after_a_train_that_raised(tmp_path):
    # Hugging Face calls no callback when train() raises: `with` detaches, and so does the next train()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradflow.integrations.hf import GradflowTrainerCallback

    x, y = data(n=8)

    class Failing(HFModel):
        calls, fail_at = 0, 3          # the first micro-batch of the second optimizer step

        def forward(self, x, labels=None):
            Failing.calls += 1
            if Failing.calls == self.fail_at:
                raise RuntimeError("boom")
            return super().forward(x, labels)

    def patched(model):
        return [n for n, m in model.named_modules() if "forward" in m.__dict__]

    model = Failing()
    with GradflowTrainerCallback(units="net.blocks.*") as cb:
        trainer = transformers.Trainer(model=model, args=hf_args(transformers, tmp_path / "a"),
                                       train_dataset=DictDataset(x, y), callbacks=[cb])
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train()
        assert cb.tracer.attached and patched(model)       # still traced: no callback ran
    assert not cb.tracer.attached and patched(model) == []
    assert set(pd.read_csv(tmp_path / "a" / "gradflow.csv")["step"]) == {0}   # the finished step, written

    Failing.calls = 0                  # without `with`: the next train() detaches the stale trace, and says so
    model = Failing()
    cb = GradflowTrainerCallback(units="net.blocks.*")
    trainer = transformers.Trainer(model=model, args=hf_args(transformers, tmp_path / "b"),
                                   train_dataset=DictDataset(x, y), callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    stale = cb.tracer
    with pytest.warns(UserWarning, match="ended without on_train_end"):
        trainer.train()
    assert not stale.attached and not cb.tracer.attached and patched(model) == []
    assert sorted(cb.tracer.units["step"].unique()) == [0, 1]
