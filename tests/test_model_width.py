"""The zoo's ``width=`` channel multiplier: parameter counts from a closed form, shapes, defaults."""
import pytest
import torch

import gradflow
from gradflow.errors import GradflowError


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def preact_count(depth: int, block: str, widths, stem: int, classes: int = 10) -> int:
    """Parameters of the official full pre-activation CIFAR net (docs/theory.md, section 7.2), by hand."""
    n = (depth - 2) // (6 if block == "basic" else 9)
    total, ch = 3 * stem * 9, stem
    for s, w in enumerate(widths):
        for i in range(n):
            cin, stride = (ch, 1 if s == 0 else 2) if i == 0 else (w, 1)
            total += 2 * cin                                   # the unit's BN pre-activation
            if block == "basic":
                total += 9 * cin * w + 2 * w + 9 * w * w       # conv3x3, BN, conv3x3
            else:
                m = w // 4                                     # 1x1, BN, 3x3, BN, 1x1
                total += cin * m + 2 * m + 9 * m * m + 2 * m + m * w
            if cin != w or stride != 1:
                total += cin * w                               # 1x1 projection shortcut
        ch = w
    return total + 2 * ch + ch * classes + classes             # head BN, linear classifier


def test_closed_form_reproduces_the_official_counts():   # the formula itself, at width 1
    assert preact_count(164, "bottleneck", (64, 128, 256), 16) == 1_703_258
    assert preact_count(1001, "bottleneck", (64, 128, 256), 16) == 10_327_706


@pytest.mark.parametrize("name,depth,block,width,widths,stem", [
    ("resnet20", 20, "basic", 0.25, (4, 8, 16), 4),
    ("resnet110", 110, "basic", 0.5, (8, 16, 32), 8),
    ("resnet56", 56, "basic", 2.0, (32, 64, 128), 32),
    ("resnet164", 164, "bottleneck", 0.25, (16, 32, 64), 4),
    ("resnet164", 164, "bottleneck", 0.3, (20, 40, 76), 5),   # outputs rounded to multiples of 4
])
def test_width_scales_every_channel_count(name, depth, block, width, widths, stem):
    m = gradflow.create_model(name, width=width)
    assert n_params(m) == preact_count(depth, block, widths, stem)
    x = torch.randn(2, 3, 32, 32)
    assert m.stem[0].out_channels == stem
    assert m.forward_features(x).shape == (2, widths[-1], 8, 8)
    assert m(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet110", "resnet164", "resnet1001", "preact_resnet18"])
def test_default_width_is_the_papers_net(name):
    assert gradflow.model_options(name)["width"] == 1.0
    assert n_params(gradflow.create_model(name, width=1.0)) == n_params(gradflow.create_model(name))


def test_width_on_every_unit_and_preact_resnet18():
    for unit in ("original", "bn_after_addition", "relu_before_addition", "relu_only_preact"):
        m = gradflow.create_model("resnet20", unit=unit, shortcut="exclusive_gate", width=0.5)
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert m.units()[-1].branch[0].out_channels == 32
    m = gradflow.create_model("preact_resnet18", width=0.125)
    assert m.fc.in_features == 64 and m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "half", True])
def test_bad_width_names_the_value(bad):
    with pytest.raises(GradflowError, match="width="):
        gradflow.create_model("resnet20", width=bad)
