"""The model zoo against the paper's architecture and closed forms."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.models import SHORTCUT_TYPES, UNIT_TYPES, ResidualUnit


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- registry -------------------------------------------------------------------------

def test_list_models_lists_the_zoo():
    names = gradflow.list_models()
    for n in ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
              "resnet164", "resnet1001", "preact_resnet18"]:
        assert n in names
    assert gradflow.list_models("resnet1*") == ["resnet110", "resnet164", "resnet1001", "resnet1202"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(gradflow.GradflowError, match="resnet110"):
        gradflow.create_model("resnet111")


def test_unknown_option_lists_the_options():
    with pytest.raises(gradflow.GradflowError, match="shortcut"):
        gradflow.create_model("resnet20", shortcutt="scale")


@pytest.mark.parametrize("kw", [dict(unit="preact"), dict(shortcut="gate"), dict(dropout=1.5),
                                dict(downsample="B"), dict(num_classes=0)])
def test_bad_option_values_are_named(kw):
    key, value = next(iter(kw.items()))
    with pytest.raises(gradflow.GradflowError, match=repr(value).replace("[", r"\[")):
        gradflow.create_model("resnet20", **kw)


def test_duplicate_registration_is_refused():
    def resnet20():
        return nn.Linear(1, 1)
    with pytest.raises(gradflow.GradflowError, match="already registered"):
        gradflow.register_model(resnet20)
    with pytest.raises(gradflow.GradflowError, match="'gpt-tiny' is already registered"):
        gradflow.register_model(name="gpt-tiny")(resnet20)


@pytest.mark.parametrize("name", gradflow.list_models())
def test_every_entry_point_is_a_function_of_its_own_name(name):
    # timm's habit: `grep "def resnet110("` finds the entry point; nothing is made in a loop
    import inspect
    from gradflow.models.registry import _lookup
    fn = _lookup(name)
    source = inspect.getsource(fn)
    assert f"def {name.replace('-', '_')}(" in source, source[:200]
    assert fn.__doc__ and fn.__name__ == name.replace("-", "_")


def test_bad_depth_says_which_depths_fit():
    with pytest.raises(gradflow.GradflowError, match="6n\\+2"):
        gradflow.models.cifar_resnet(21, "basic")


# --- the reference architecture ----------------------------------------------------------

@pytest.mark.parametrize("name,count", [("resnet164", 1_703_258), ("resnet1001", 10_327_706)])
def test_parameter_counts_match_the_official_code(name, count):
    assert n_params(gradflow.create_model(name)) == count


def test_resnet110_has_about_1_73m_parameters():
    assert abs(n_params(gradflow.create_model("resnet110")) - 1.73e6) / 1.73e6 < 0.01


def test_cifar100_head():
    m = gradflow.create_model("resnet164", num_classes=100)
    assert m.fc.out_features == 100
    assert n_params(m) == 1_703_258 + 256 * 90 + 90


def _weight_layers_on_main_path(model):
    """Convs in stem and branches plus the classifier: the depth the paper counts."""
    count = sum(isinstance(m, nn.Conv2d) for m in model.stem.modules()) + 1
    for u in model.units():
        count += sum(isinstance(m, nn.Conv2d) for m in u.branch.modules())
    return count


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet110", "resnet164", "resnet1001", "resnet1202"])
def test_depth_is_what_the_name_says(name):
    depth = int(name[len("resnet"):])
    assert _weight_layers_on_main_path(gradflow.create_model(name)) == depth


def test_official_preact_layout():
    m = gradflow.create_model("resnet164")
    assert [type(x) for x in m.stem] == [nn.Conv2d]                  # no BN-ReLU after the stem
    assert isinstance(m.head_act[0], nn.BatchNorm2d)                 # final BN-ReLU
    first = [s[0] for s in m.stages]
    assert all(u.shortcut_preact and isinstance(u.shortcut, nn.Conv2d) for u in first)
    assert [u.stride for u in first] == [1, 2, 2]
    assert [u.out_channels for u in first] == [64, 128, 256]
    rest = [u for s in m.stages for u in list(s)[1:]]
    assert all(isinstance(u.shortcut, nn.Identity) and not u.shortcut_preact for u in rest)
    assert not any(c.bias is not None for c in m.modules() if isinstance(c, nn.Conv2d))


def test_he_fan_out_init():
    m = gradflow.create_model("resnet110")
    conv = m.stages[2][5].branch[0]                                 # 3x3, 64 -> 64
    expected = (2.0 / (3 * 3 * 64)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02


# --- every model and every variant runs -------------------------------------------------

@pytest.mark.parametrize("name", [n for n in gradflow.list_models()
                                  if gradflow.model_inputs(n)["kind"] == "image"])  # tokens: test_transformers
def test_every_registered_model_runs_forward_and_backward(name):
    m = gradflow.create_model(name)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("unit,shortcut", list(itertools.product(UNIT_TYPES, SHORTCUT_TYPES)))
@pytest.mark.parametrize("name", ["resnet110", "resnet164"])
def test_every_unit_and_shortcut_runs_at_real_depth(name, unit, shortcut):
    m = gradflow.create_model(name, unit=unit, shortcut=shortcut, num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert m.stem[0].weight.grad is not None


@pytest.mark.parametrize("unit", UNIT_TYPES)
def test_pad_downsampling_runs(unit):
    m = gradflow.create_model("resnet20", unit=unit, downsample="pad")
    assert not any(isinstance(s[0].shortcut, nn.Conv2d) for s in m.stages)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- the unit types are Table 2's placements -----------------------------------------------

def _bn(bn, t):  # train-mode BN from its parameters, computed by hand
    mu = t.mean((0, 2, 3), keepdim=True)
    var = t.var((0, 2, 3), unbiased=False, keepdim=True)
    return (t - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _convs_bns(unit):
    convs = [m for m in unit.branch if isinstance(m, nn.Conv2d)]
    bns = [m for m in unit.branch if isinstance(m, nn.BatchNorm2d)]
    return convs, bns


def _conv(c, t):
    return F.conv2d(t, c.weight, None, c.stride, c.padding)


@pytest.mark.parametrize("unit_type", UNIT_TYPES)
def test_unit_computes_its_table_2_placement(unit_type):
    torch.manual_seed(1)
    u = ResidualUnit(gradflow.models.UnitSpec(unit=unit_type), 8, 8)
    for m in u.modules():   # make BN affine parameters non-trivial
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(4, 8, 6, 6)
    (c1, c2), bns = _convs_bns(u)
    relu = torch.relu
    if unit_type == "original":
        expected = relu(x + _bn(bns[1], _conv(c2, relu(_bn(bns[0], _conv(c1, x))))))
    elif unit_type == "bn_after_addition":
        y = x + _conv(c2, relu(_bn(bns[0], _conv(c1, x))))
        expected = relu(_bn(u.post[0], y))
    elif unit_type == "relu_before_addition":
        expected = x + relu(_bn(bns[1], _conv(c2, relu(_bn(bns[0], _conv(c1, x))))))
    elif unit_type == "relu_only_preact":
        expected = x + _bn(bns[1], _conv(c2, relu(_bn(bns[0], _conv(c1, relu(x))))))
    else:
        expected = x + _conv(c2, relu(_bn(bns[0], _conv(c1, relu(_bn(u.preact[0], x))))))
    torch.testing.assert_close(u(x), expected, rtol=1e-4, atol=1e-5)


# --- closed forms of Table 1 ---------------------------------------------------------------

def _zero_branches(model):
    """Make every residual branch output exactly zero (its last weight layer zeroed)."""
    for u in model.units():
        last = [m for m in u.branch if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()


@pytest.mark.parametrize("scale", [0.5, 0.9, 0.0])
def test_constant_scaling_with_zero_branches_is_prod_lambda(scale):
    m = gradflow.create_model("resnet110", shortcut="scale", scale=scale)
    _zero_branches(m)
    stage = m.stages[1]                    # units 1..17 keep the shape
    x = torch.randn(3, 32, 16, 16)
    out = stage[1:](x)
    torch.testing.assert_close(out, scale ** 17 * x, rtol=1e-5, atol=1e-30)


def test_identity_net_with_zero_branches_carries_x_unchanged():
    m = gradflow.create_model("resnet110", downsample="pad")
    _zero_branches(m)
    x = torch.randn(2, 16, 32, 32)
    out = m.stages(x)
    expected = F.pad(x[:, :, ::4, ::4], (0, 0, 0, 0, 0, 48))      # two stride-2 pads
    torch.testing.assert_close(out, expected)


def test_scale_branch_puts_one_minus_lambda_on_f():
    u = ResidualUnit(gradflow.models.UnitSpec(shortcut="scale", scale=0.3, scale_branch=True), 4, 4)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(u(x), 0.3 * x + 0.7 * u.branch(u.preact(x)))


def test_dropout_shortcut_is_identity_in_eval_and_masks_in_train():
    m = gradflow.create_model("resnet20", shortcut="dropout", dropout=0.5)
    _zero_branches(m)
    u = m.stages[1][1]
    x = torch.randn(4, 32, 8, 8)
    u.eval()
    torch.testing.assert_close(u(x), x)
    u.train()
    y = u(x)
    kept = y != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(y[kept], 2 * x[kept])


@pytest.mark.parametrize("exclusive", [True, False])
def test_gates_follow_their_formula(exclusive):
    kind = "exclusive_gate" if exclusive else "shortcut_gate"
    u = ResidualUnit(gradflow.models.UnitSpec(unit="original", shortcut=kind, gate_bias=-2.0), 4, 4)
    assert torch.all(u.combine.conv.bias == -2.0)
    x = torch.randn(2, 4, 5, 5)
    g = torch.sigmoid(F.conv2d(x, u.combine.conv.weight, u.combine.conv.bias))
    r = u.branch(x)
    y = (1 - g) * x + (g * r if exclusive else r)
    torch.testing.assert_close(u(x), torch.relu(y))


def test_model_gate_bias_survives_init():
    m = gradflow.create_model("resnet20", shortcut="exclusive_gate", gate_bias=-6.0)
    assert all(torch.all(u.combine.conv.bias == -6.0) for u in m.units())


def test_conv_shortcut_on_every_unit():
    m = gradflow.create_model("resnet20", shortcut="conv")
    assert all(isinstance(u.shortcut, nn.Conv2d) and u.shortcut.kernel_size == (1, 1) for u in m.units())


def test_preact_resnet18_layout():
    m = gradflow.create_model("preact_resnet18")
    assert [len(s) for s in m.stages] == [2, 2, 2, 2]
    assert [s[0].out_channels for s in m.stages] == [64, 128, 256, 512]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- one source for the unit options and the paper's variants -------------------------------

def test_entry_point_options_are_the_unit_specs_fields():
    import dataclasses
    fields = {f.name: f.default for f in dataclasses.fields(gradflow.models.UnitSpec) if f.name != "block"}
    for name in ("resnet20", "resnet164", "preact_resnet18"):
        opts = gradflow.model_options(name)
        assert {k: v for k, v in opts.items() if k in fields} == fields
        assert set(opts) - set(fields) == {"num_classes", "width"}
    m = gradflow.create_model("resnet20", unit="original", shortcut="scale", scale=0.25, scale_branch=True)
    assert m.spec == gradflow.models.UnitSpec(unit="original", shortcut="scale", scale=0.25, scale_branch=True)


def test_paper_rows_build_and_the_trainer_presets_are_the_same_rows():
    from gradflow.models import paper_rows
    rows = paper_rows(runnable=True)
    assert len(paper_rows("1")) == 16 and len(paper_rows("2")) == 10
    for r in rows:   # every row's options are options its model takes
        assert set(r.options) <= set(gradflow.model_options(r.model)), r
    from gradflow.training import presets
    table = {p.name: p for p in presets().values()}
    for r in paper_rows():
        assert r.name in table, r.name
        p = table[r.name]
        assert (p.model, dict(p.options), p.dataset, p.paper_error) == (r.model, r.options, r.dataset,
                                                                          r.paper_error), r.name
