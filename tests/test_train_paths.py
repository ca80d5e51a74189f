"""--probe-paths: the trainer records the exact path-length split at each probe into paths.csv.

Its k = 0 component is checked against the direct term the same probe wrote to probe.csv by the
direct/residual split (another mechanism: the shortcut chain, not the component stack), and its
per-unit gradient against probe.csv's; an interrupted run resumed keeps exactly the rows the
checkpoint vouches for and ends with the same table as an uninterrupted one.
"""
import numpy as np
import pandas as pd
import pytest

from gradflow.data.cifar import synthetic_cifar
from gradflow.errors import GradflowError
from gradflow.runs.read import read_run
from gradflow.training import resolve, resume_config, run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic_cifar(root, n_train=32, n_test=8)
    return root


def cfg(data, out, **kw):
    base = dict(model="resnet20", data=str(data), verify_data=False, batch_size=4, stop=8, warmup_iters=0,
                lr=0.05, milestones=(), log_every=2, eval_every=4, checkpoint_every=4, out_dir=str(out),
                run_name="run", progress=False, device="cpu", deterministic=True, fail_error=1.0,
                probe_every=3, probe_paths=2, amp="none")   # two exact mechanisms: compared in float32
    return resolve(**{**base, **kw})


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_training(cfg(data, out))
    return read_run(out / "run")


def test_paths_rows_match_the_probe(whole):
    paths, probe = whole.paths, whole.probe
    assert sorted(paths["iteration"].unique()) == [0, 3, 6] == sorted(probe["iteration"].unique())
    assert set(paths["k"]) == {0, 1, 2, -1}
    units = probe[~probe["is_top"]]
    direct = paths[paths["k"] == 0].merge(units, on=["iteration", "unit"], suffixes=("", "_probe"))
    assert len(direct) == len(units) > 0
    np.testing.assert_allclose(direct["norm"], direct["direct_norm"], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(direct["grad_norm"], direct["grad_norm_probe"], rtol=1e-4, atol=1e-12)


def test_resume_keeps_what_the_checkpoint_vouches_for(data, whole, tmp_path):
    run_training(cfg(data, tmp_path, halt_at=5))        # checkpoint at 5: probes 0 and 3 are on disk
    run = tmp_path / "run"
    on_disk = pd.read_csv(run / "paths.csv")
    assert sorted(on_disk["iteration"].unique()) == [0, 3]
    stray = on_disk[on_disk["iteration"] == 3].assign(iteration=6)   # as if killed after probe 6's write
    stray.to_csv(run / "paths.csv", mode="a", header=False, index=False)
    run_training(resume_config(run), resume=run)
    again = read_run(run).paths
    pd.testing.assert_frame_equal(again.drop(columns="grad_norm"), whole.paths.drop(columns="grad_norm"),
                                  check_exact=False, rtol=1e-5)
    assert len(again) == len(whole.paths)


def test_probe_paths_needs_probe_every(data, tmp_path):
    with pytest.raises(GradflowError, match="probe_paths.*--probe-paths.*--probe-every"):
        cfg(data, tmp_path, probe_every=0)


def test_pathplots_draws_a_run(whole, tmp_path, capsys):
    from gradflow.cli.paths import main
    assert main(["--run", str(whole.path), "--out", str(tmp_path)]) == 0
    caption = (tmp_path / "paths_over_training_run.txt").read_text()
    assert "iterations 0, 3, 6; k up to 2 apart" in caption
    assert (tmp_path / "paths_over_training_run.png").stat().st_size > 0
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert main(["--run", str(bare), "--out", str(tmp_path)]) == 2
    assert "--probe-paths" in capsys.readouterr().err


def test_paths_of_a_trained_checkpoint_are_named_by_its_run_and_say_its_error(whole, data, tmp_path, capsys):
    import json
    from gradflow.cli.paths import main
    status = json.loads((whole.path / "status.json").read_text())
    assert main(["--checkpoint", str(whole.path / "checkpoint.pt"), "--data", str(data), "--batch", "4",
                 "--samples", "2", "--k-step", "4", "--out", str(tmp_path)]) == 0
    caption = (tmp_path / "paths_run_spectrum.txt").read_text()
    assert f"test error {100 * status['test_error']:.1f}%" in caption
    assert "8 iterations" in caption
    assert main(["--checkpoint", str(whole.path / "checkpoint.pt"), "--data", str(data), "--batch", "4",
                 "--samples", "2", "--k-step", "4", "--model", "resnet110", "--out", str(tmp_path)]) == 0
    assert "--model resnet110 is not used" in capsys.readouterr().err


def test_paths_init_is_the_network_its_trainer_built(data, tmp_path, monkeypatch):
    """--init rebuilds the run's initialisation; checked against the very model the trainer built
    (captured as it is created), measured by the path split on the same test images."""
    import argparse
    import copy
    import torch
    import gradflow.training.loop as loop
    from gradflow.cli.paths import main
    from gradflow.experiments.lesion import cifar_test_batches
    from gradflow.runs.checkpoint import load_checkpoint
    from gradflow.tracing.paths import path_components
    built = []

    def recording(*a, **kw):
        m = create(*a, **kw)
        if not any(p.is_meta for p in m.parameters()):
            built.append(copy.deepcopy(m))
        return m
    create = loop.create_model
    monkeypatch.setattr(loop, "create_model", recording)
    run_training(cfg(data, tmp_path, run_name="seeded", seed=3, stop=4, probe_every=0, probe_paths=0))
    monkeypatch.undo()
    assert len(built) == 1
    fresh = copy.deepcopy(built[0])                           # BN's running stats as the trainer made them
    run = tmp_path / "seeded"
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--data", str(data), "--batch", "4", "--init",
                 "--samples", "2", "--k-step", "4", "--out", str(tmp_path / "f")]) == 0
    _, info = load_checkpoint(run)
    ns = argparse.Namespace(synthetic=False, data=str(data), no_verify=True, test_images=4, batch_size=4)
    x, y = cifar_test_batches(info, ns, torch.device("cpu"))[0][0]
    want = path_components(built[0].train(), x, y=y).table
    want = want[(want["unit"] == want["unit"].min()) & (want["k"] >= 0)].sort_values("k")
    got = pd.read_csv(tmp_path / "f" / "paths_seeded-init.csv").sort_values("k")
    np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-5)
    trained = pd.read_csv(tmp_path / "f" / "paths_seeded.csv").sort_values("k")
    assert not np.allclose(trained["norm"], got["norm"], rtol=1e-3)        # four steps moved it
    caption = (tmp_path / "f" / "paths_seeded-init_contribution.txt").read_text()
    assert "at initialisation" in caption and "torch.manual_seed(3)" in caption
    assert main(["--init", "--out", str(tmp_path / "g")]) == 2                # no run to rebuild
    from gradflow.experiments.lesion import error_rate
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--data", str(data), "--batch", "4", "--init",
                 "--samples", "2", "--k-step", "4", "--lesion", str(run), "--out", str(tmp_path / "h")]) == 0
    ns = argparse.Namespace(synthetic=False, data=str(data), no_verify=True, test_images=0, batch_size=500)
    batches = cifar_test_batches(info, ns, torch.device("cpu"))[0]
    want = error_rate(fresh, batches)                         # the trainer's own init, on every test image
    assert f"the same network at initialisation: {want:.1f}% test error" in (
        tmp_path / "h" / "lesion_curves.txt").read_text()
