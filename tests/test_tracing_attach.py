"""The tracer leaves a model as it found it when attaching fails, and says what an empty batch gives."""
import numpy as np
import pytest
import torch

import gradflow


class BrokenSink:
    def open(self, tracer):
        raise OSError("cannot open the sink's file")

    def close(self):
        pass


class CountingSink:
    def __init__(self):
        self.opened = self.closed = 0

    def open(self, tracer):
        self.opened += 1

    def close(self):
        self.closed += 1


def _state(model):
    return ([("forward" in m.__dict__) for m in model.modules()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()])


def _clean_rows():
    """The unit table of an untouched resnet20 traced on two samples."""
    model = gradflow.create_model("resnet20")
    with gradflow.trace(model) as tr:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    return tr.units


def test_a_sink_whose_open_fails_leaves_the_model_unpatched_and_traceable():
    model = gradflow.create_model("resnet20")
    before = _state(model)
    first = CountingSink()
    with pytest.raises(OSError, match="cannot open"):
        with gradflow.trace(model, sinks=[first, BrokenSink()]):
            pass
    assert _state(model) == before               # no patched forward, no hook left
    assert first.opened == first.closed == 1     # the sink opened before the failure is closed
    x = torch.randn(2, 3, 32, 32)
    with gradflow.trace(model) as tr:            # not "already traced"
        model(x).sum().backward()
    assert len(tr.units) == len(_clean_rows())


def test_an_empty_batch_gives_rows_of_zero_samples_and_says_so():
    model = gradflow.create_model("resnet20")
    with gradflow.trace(model) as tr:
        model(torch.zeros(0, 3, 32, 32)).sum().backward()
    with pytest.warns(UserWarning, match="0 samples"):
        units = tr.units
    assert len(units) == len(_clean_rows()) and (units["batch"] == 0).all()
    assert units.filter(like="_q50").isna().all().all()
