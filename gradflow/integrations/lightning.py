"""A PyTorch Lightning callback that traces the LightningModule while it trains.

    from gradflow.integrations.lightning import GradflowCallback
    cb = GradflowCallback(schedule=10)            # every 10th optimizer step
    trainer = lightning.Trainer(callbacks=[cb], ...)
    trainer.fit(module, loader)
    cb.tracer.units                               # or the sinks' files / TensorBoard

A step is one optimizer step (``accumulate_grad_batches`` batches are its
micro-batches, each opened at ``on_train_batch_start``); validation runs under
``no_grad`` and gives ``phase="eval"`` rows. By default the rows stream to the
trainer's TensorBoard logger when it has one (``TensorBoardSink``), else to
``<log_dir>/gradflow.csv``; pass ``sinks=`` to choose. Under the DDP strategy every
rank traces its slice and the rows are joined into the global batch's (one line on
rank 0 says so; :mod:`gradflow.tracing.distributed`); sinks write on rank 0. Needs ``lightning``
(``pip install 'gradflow[lightning]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("gradflow.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'gradflow[lightning]'") from e

from gradflow.tracing import CSVSink, TensorBoardSink, Tracer
from gradflow.integrations import innermost_optimizer
from gradflow.tracing.distributed import say


class GradflowCallback(pl.Callback):
    """Trace the LightningModule's residual units during ``fit``.

    Args:
        sinks: where rows go; None picks TensorBoard (the trainer's logger) or a CSV file.
        history: steps kept in memory on ``self.tracer`` (None: all).
        trace_kwargs: passed to :class:`gradflow.Tracer` (``units=``, ``schedule=``,
            ``quantities=``, ``split=``, ...).
    """

    def __init__(self, sinks: Optional[Sequence] = None, history: Optional[int] = None, **trace_kwargs: Any):
        super().__init__()
        self.sinks, self.history, self.kwargs = sinks, history, trace_kwargs
        self.tracer: Optional[Tracer] = None

    def _default_sinks(self, trainer) -> list:
        for logger in getattr(trainer, "loggers", []) or []:
            exp = getattr(logger, "experiment", None)
            if type(logger).__name__ == "TensorBoardLogger" and exp is not None:
                return [TensorBoardSink(writer=exp)]
        root = Path(trainer.log_dir or trainer.default_root_dir)
        return [CSVSink(root / "gradflow.csv")]

    def on_fit_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradflowCallback traces one optimizer; this module has "
                             f"{len(trainer.optimizers)}: use gradflow.trace(...) in training_step")
        opt = innermost_optimizer(trainer.optimizers[0])
        sinks = list(self.sinks) if self.sinks is not None else self._default_sinks(trainer)
        self.tracer = Tracer(pl_module, optimizer=opt, sinks=sinks, history=self.history, **self.kwargs)
        self.tracer.attach()
        say(self.tracer, "gradflow GradflowCallback")   # under DDP/FSDP: the global batch, gathered

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.tracer is not None:
            self.tracer.new_micro()     # a batch is a micro-batch, however training_step calls the net

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.tracer is not None:
            self.tracer.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.tracer is not None:
            self.tracer.detach()
