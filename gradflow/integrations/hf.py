"""A Hugging Face ``Trainer`` callback that traces the model while it trains.

    from gradflow.integrations.hf import GradflowTrainerCallback
    cb = GradflowTrainerCallback(sinks=[gradflow.tracing.CSVSink("gradflow.csv")])
    trainer = transformers.Trainer(model=model, args=args, callbacks=[cb], ...)
    trainer.train()
    cb.tracer.units

A step is one optimizer step (``gradient_accumulation_steps`` forwards are its
micro-batches); evaluation runs under ``no_grad`` and gives ``phase="eval"``
rows. By default rows stream to ``<output_dir>/gradflow.csv``. Needs
``transformers`` and ``accelerate`` (``pip install 'gradflow[hf]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("gradflow.integrations.hf needs transformers: pip install 'gradflow[hf]'") from e

from ..tracing import CSVSink, Tracer
from . import innermost_optimizer


class GradflowTrainerCallback(TrainerCallback):
    """Trace the model's residual units during ``Trainer.train()``.

    Args:
        sinks: where rows go; None writes ``<output_dir>/gradflow.csv``.
        history: steps kept in memory on ``self.tracer`` (None: all).
        trace_kwargs: passed to :class:`gradflow.Tracer`.
    """

    def __init__(self, sinks: Optional[Sequence] = None, history: Optional[int] = None, **trace_kwargs: Any):
        self.sinks, self.history, self.kwargs = sinks, history, trace_kwargs
        self.tracer: Optional[Tracer] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("GradflowTrainerCallback: the Trainer passed no model/optimizer to "
                             "on_train_begin; trace the model yourself with gradflow.trace(model, optimizer=...)")
        sinks = list(self.sinks) if self.sinks is not None else [CSVSink(Path(args.output_dir) / "gradflow.csv")]
        self.tracer = Tracer(model, optimizer=innermost_optimizer(optimizer), sinks=sinks,
                             history=self.history, **self.kwargs)
        self.tracer.attach()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracer is not None:
            self.tracer.detach()
