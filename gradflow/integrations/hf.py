"""A Hugging Face ``Trainer`` callback that traces the model while it trains.

    from gradflow.integrations.hf import GradflowTrainerCallback
    cb = GradflowTrainerCallback(sinks=[gradflow.tracing.CSVSink("gradflow.csv")])
    trainer = transformers.Trainer(model=model, args=args, callbacks=[cb], ...)
    trainer.train()
    cb.tracer.units

Hugging Face calls no callback when ``train()`` raises, so the model would stay
traced; ``with GradflowTrainerCallback(...) as cb:`` around the training detaches
it on any exit (``cb.close()`` does the same), and a later ``train()`` detaches
a trace left over from one that raised, with a warning.

A step is one optimizer step (``gradient_accumulation_steps`` forwards are its
micro-batches); evaluation runs under ``no_grad`` and gives ``phase="eval"``
rows. By default rows stream to ``<output_dir>/gradflow.csv``. Launched by ``torchrun``
(DDP) every rank traces its slice and the rows are joined into the global batch's
(one line on rank 0 says so; :mod:`gradflow.tracing.distributed`), written by rank 0. Needs
``transformers`` and ``accelerate`` (``pip install 'gradflow[hf]'``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("gradflow.integrations.hf needs transformers: pip install 'gradflow[hf]'") from e

from gradflow.tracing import CSVSink, Tracer
from gradflow.integrations import innermost_optimizer
from gradflow.tracing.distributed import say


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

    def __enter__(self) -> "GradflowTrainerCallback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Detach the trace: the model's modules as they were, pending rows written, sinks closed."""
        if self.tracer is not None:
            self.tracer.detach()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.tracer is not None and self.tracer.attached:
            warnings.warn("gradflow: the previous Trainer.train() ended without on_train_end (it raised?); "
                          "its trace is detached now and its pending rows written. Wrap the training in "
                          "`with GradflowTrainerCallback(...) as cb:` to detach when it raises", stacklevel=2)
            self.tracer.detach()
        if model is None or optimizer is None:
            raise ValueError("GradflowTrainerCallback: the Trainer passed no model/optimizer to "
                             "on_train_begin; trace the model yourself with gradflow.trace(model, optimizer=...)")
        sinks = list(self.sinks) if self.sinks is not None else [CSVSink(Path(args.output_dir) / "gradflow.csv")]
        self.tracer = Tracer(model, optimizer=innermost_optimizer(optimizer), sinks=sinks,
                             history=self.history, **self.kwargs)
        self.tracer.attach()
        say(self.tracer, "gradflow GradflowTrainerCallback")   # under DDP/FSDP: the global batch, gathered

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
