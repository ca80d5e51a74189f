"""The tracer in every floating dtype: float64 kept as float64, bf16/fp16 reduced in float32."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from tracing_helpers import per_sample_norm, unit_inputs_and_grads, zoo_direct

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def batch(dtype, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def traced(model, x, y, **kw):
    with gradflow.trace(model, **kw) as tr:
        out = model(x)
        F.cross_entropy(out if out.dtype == torch.float64 else out.float(), y).backward()
    return tr


def column(tr, name, i):
    s = tr.samples.sort_values(["unit", "sample"])
    return s.loc[s["unit"] == i, name].to_numpy()


def test_float64_resnet_totals_and_split_match_float64_autograd():
    torch.manual_seed(0)
    m = gradflow.create_model("resnet20", unit="original").double()
    x, y = batch(torch.float64)
    directs, _ = zoo_direct(m, x, y)
    _, grads = unit_inputs_and_grads(m, m.units(), x, y)
    tr = traced(m, x, y)
    for i, (g, d) in enumerate(zip(grads, directs)):
        # float64 all the way: agreement far below float32's 1e-7
        np.testing.assert_allclose(column(tr, "grad_norm", i), per_sample_norm(g).numpy(), rtol=1e-11)
        np.testing.assert_allclose(column(tr, "direct_norm", i), per_sample_norm(d).numpy(), rtol=1e-11)
        np.testing.assert_allclose(column(tr, "residual_norm", i), per_sample_norm(g - d).numpy(),
                                   rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16,
                                   pytest.param(torch.float16, marks=pytest.mark.slow)])  # CPU fp16 conv: 14 s
def test_half_precision_models_give_finite_rows_close_to_float32(dtype):
    torch.manual_seed(0)
    m32 = gradflow.create_model("resnet20", unit="original")
    m = copy.deepcopy(m32).to(dtype)
    x, y = batch(torch.float32)
    ref = traced(m32, x, y).units
    low = traced(m, x.to(dtype), y).units
    cols = ["x_norm", "grad_norm", "direct_norm"]
    assert np.isfinite(low[cols].to_numpy()).all()
    tol = 0.1 if dtype == torch.bfloat16 else 0.02     # 8 and 11 mantissa bits through 20 units
    np.testing.assert_allclose(low[cols].to_numpy(), ref[cols].to_numpy(), rtol=tol)
