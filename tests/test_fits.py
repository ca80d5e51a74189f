"""Input the model cannot take and sizes that cannot fit: refused in one line, before anything large exists."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradflow
from gradflow.errors import GradflowError
from gradflow.utils import memory
from gradflow.utils.memory import Estimate, activation_bytes, check_fits, parameter_bytes, step_estimate


def _leaf_output_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """The independent count: a real forward, every leaf module's output summed."""
    sizes = []

    def hook(m, i, out):
        outs = out if isinstance(out, tuple) else (out,)
        sizes.extend(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(sizes)


@pytest.mark.parametrize("name,options", [("resnet20", {}), ("resnet20", {"unit": "full_preact"}),
                                          ("resnet20", {"shortcut": "scale", "scale": 0.5})])
def test_the_estimate_counts_what_a_real_forward_of_the_whole_batch_produces(name, options):
    """Built: a forward of two samples, scaled to the batch; on meta: shapes alone. Both equal the
    leaf outputs of a real forward of all six samples, and the model is left as it was."""
    model = gradflow.create_model(name, **options)
    x = torch.randn(6, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = activation_bytes(model, x.shape)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert got == _leaf_output_bytes(model, x)
    with torch.device("meta"):
        ghost = gradflow.create_model(name, **options)
    assert activation_bytes(ghost, x.shape) == _leaf_output_bytes(model, x)


def test_a_model_built_on_meta_is_sized_without_allocating():
    with torch.device("meta"):
        huge = gradflow.create_model("resnet20", width=10 ** 4)
    # closed form for the widest stage's 3x3 convs alone: 64 * width channels in and out
    c = 64 * 10 ** 4
    assert parameter_bytes(huge) > 9 * c * c * 4
    assert activation_bytes(huge, (2, 3, 32, 32)) > 0


def test_a_forward_that_cannot_run_gives_no_activation_figure():
    class ReadsValues(nn.Module):     # no parameters: sized on meta, where .item() raises
        def forward(self, x):
            return x * float(x.sum())

    class NeedsThree(nn.Module):      # a built model whose forward refuses a sample of two
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            if len(x) < 3:
                raise ValueError("at least three samples")
            return self.lin(x)

    assert activation_bytes(ReadsValues(), (2, 3)) is None
    assert activation_bytes(NeedsThree(), (8, 3)) is None


def test_check_fits_refuses_only_beyond_what_is_available(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2 ** 30)
    check_fits(Estimate({"input": 9 * 2 ** 30}), torch.device("cpu"), "x", "fix")
    with pytest.raises(GradflowError, match=r"needs at least 11 GiB.*10 GiB available: pass less"):
        check_fits(Estimate({"input": 11 * 2 ** 30}), torch.device("cpu"), "probing x", "pass less")


def test_the_estimate_adds_activations_when_the_input_is_large(monkeypatch):
    model = gradflow.create_model("resnet20")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 20 * 2 ** 20)  # 20 MiB: the activations are counted
    shape = (2, 3, 32, 32)
    est = step_estimate(model, shape, torch.device("cpu"), training=True)
    assert est.parts["parameters"] == 3 * parameter_bytes(model)
    assert est.parts["input"] == 2 * 3 * 32 * 32 * 4
    assert est.parts["activations"] == _leaf_output_bytes(model, torch.randn(shape))


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_probe_refuses_a_batch_that_cannot_fit_before_drawing_it(tmp_path, capsys):
    from gradflow.cli.probe import main
    free = memory.available_bytes(torch.device("cpu"))
    if free is None or free > 400 * 2 ** 30:
        pytest.skip("this machine does not say how much memory it has, or has more than the batch needs")
    assert main(["--model", "resnet20", "--batch-size", "10000", "--image-size", "2048",     # 469 GiB
                 "--out", str(tmp_path / "p")]) == 2
    err = _err(capsys)
    assert "needs at least" in err and "available" in err and "--batch-size" in err
    assert not (tmp_path / "p").exists()


def test_train_refuses_a_model_too_wide_to_build(tmp_path, capsys):
    from gradflow.cli.train import get_args_parser, main
    args = get_args_parser().parse_args(["--model", "resnet20", "--model-opt", "width=1e6", "--synthetic",
                                         "--stop", "1", "--out-dir", str(tmp_path / "o"), "--no-progress"])
    assert main(args) == 2
    err = _err(capsys)
    assert "width=1000000" in err and "needs at least" in err and "parameters" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model,size", [("timm:vit_tiny_patch16_224", 8), ("timm:convnext_atto", 8),
                                        ("torchvision:vit_b_16", 32)])
def test_an_image_size_the_model_cannot_take_names_the_shape_and_its_size(model, size, tmp_path, capsys):
    pytest.importorskip(model.split(":")[0])
    from gradflow.cli.probe import main
    assert main(["--model", model, "--image-size", str(size), "--batch-size", "2",
                 "--out", str(tmp_path / "p")]) == 2
    err = _err(capsys)
    assert f"[3, {size}, {size}]" in err and "--image-size it was made for (224)" in err
    assert not (tmp_path / "p").exists()


def test_a_tracer_fault_is_not_blamed_on_the_input(monkeypatch, tmp_path):
    import gradflow.probe.run as run
    from gradflow.probe import ProbeConfig, run_probe

    def broken(*a, **k):
        raise RuntimeError("a fault inside gradflow")
    monkeypatch.setattr(run, "trace_once", broken)
    with pytest.raises(RuntimeError, match="inside gradflow"):   # the plain forward runs: not the input's fault
        run_probe(ProbeConfig(model="resnet20", batch_size=2, out=str(tmp_path)))


@pytest.mark.parametrize("value,words", [("nan", "must be an integer (default 768)"),
                                         ("64.5", "must be an integer")])
def test_hf_config_values_keep_their_fields_kind(value, words, tmp_path, capsys):
    pytest.importorskip("transformers")
    from gradflow.cli.probe import main
    assert main(["--model", "hf:gpt2", "--hf-config", f"n_embd={value},n_layer=1",
                 "--out", str(tmp_path / "p")]) == 2
    err = _err(capsys)
    assert f"n_embd={value!r}" in err or f"n_embd={value}" in err
    assert words in err


def test_constant_test_images_are_said_first_and_nothing_is_written(tmp_path, capsys):
    from gradflow.cli.probe import main
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.full((32, 3072), 7, np.uint8), b"labels": [i % 10 for i in range(32)]}, f)
    assert main(["--model", "resnet20", "--data", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = _err(capsys)
    assert "constant" in err and "test_batch" in err
    assert not (tmp_path / "p").exists()


def test_a_step_that_raises_inside_a_trace_is_named_in_the_nan_rows_warning():
    model = gradflow.create_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="raised ValueError before a backward pass"):
        with pytest.raises(ValueError):
            with gradflow.trace(model):
                model(x)
                raise ValueError("the user's loss failed")
