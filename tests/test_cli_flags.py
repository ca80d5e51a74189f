"""Bad input to every command: one line, exit 2, naming the value and the fix; shared flags, shared rules."""
import shlex
import sys

import pytest

from gradflow.cli import experiment as exp_cli
from gradflow.cli import figures as fig_cli
from gradflow.cli import lesion as lesion_cli
from gradflow.cli import paths as paths_cli


def _rc(main, argv):
    try:
        return main(argv)
    except SystemExit as e:   # argparse exits from parse_args
        return e.code


def _one_line(capsys, words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize("main", [fig_cli.main, paths_cli.main, lesion_cli.main], ids=["figures", "paths", "lesion"])
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--seed", "x"]])
def test_unknown_and_malformed_flags_are_one_line_not_the_usage_block(main, argv, capsys):
    extra = ["--checkpoint", "x"] if main is lesion_cli.main else []
    assert _rc(main, argv + extra) == 2
    _one_line(capsys, ["error"])


def test_a_missing_required_flag_is_one_line(capsys):
    assert _rc(lesion_cli.main, []) == 2
    _one_line(capsys, ["--checkpoint"])


@pytest.mark.parametrize("argv,words", [
    (["--batch", "0"], ["batch=0", "--batch"]),
    (["--batch", "-1"], ["batch=-1"]),
    (["--deep-batch", "0"], ["deep_batch=0", "--deep-batch"]),
    (["--seed", "-1"], ["seed=-1", "--seed", "non-negative"]),
    (["--only", "nosuch_*"], ["nosuch_*", "--list"]),
])
def test_figures_refuses_what_it_used_to_take_or_crash_on(argv, words, capsys, tmp_path):
    assert _rc(fig_cli.main, argv + ["--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,words", [
    (["--batch", "0"], ["batch=0"]), (["--batch", "-1"], ["batch=-1"]),
    (["--k-step", "0"], ["k_step=0", "--k-step"]), (["--k-step", "-1"], ["k_step=-1"]),
    (["--seed", "-1"], ["seed=-1"]),
])
def test_pathplots_refuses_bad_numbers(argv, words, capsys, tmp_path):
    assert _rc(paths_cli.main, argv + ["--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, words)


def test_lesion_refuses_a_negative_seed_and_synthetic_with_data(capsys, tmp_path):
    assert _rc(lesion_cli.main, ["--checkpoint", str(tmp_path), "--seed", "-1"]) == 2
    _one_line(capsys, ["seed=-1"])
    assert _rc(lesion_cli.main, ["--checkpoint", str(tmp_path), "--synthetic", "--data", str(tmp_path)]) == 2
    _one_line(capsys, ["--synthetic", "--data", "one of them"])


@pytest.mark.parametrize("which", ["figures", "paths", "lesion", "experiment-out", "experiment-figures-out"])
def test_an_out_folder_inside_a_file_is_refused(which, a_file, capsys, tmp_path):
    inside = str(a_file / "sub")
    if which == "figures":
        rc = _rc(fig_cli.main, ["--out", inside])
    elif which == "paths":
        rc = _rc(paths_cli.main, ["--out", inside])
    elif which == "lesion":
        rc = _rc(lesion_cli.main, ["--checkpoint", str(tmp_path), "--out", inside])
    else:
        flag = "--out" if which == "experiment-out" else "--figures-out"
        rc = _rc(exp_cli.main, ["table2", "--data", str(tmp_path), flag, inside])
    assert rc == 2
    _one_line(capsys, [str(a_file), "is a file"])


@pytest.mark.parametrize("argv,words", [
    (["--out", ""], ["--out ''", "empty"]),
    (["--jobs", "0", "--gpus", "none"], ["jobs=0"]),
    (["--gpus", "xyz"], ["--gpus 'xyz'"]),
    (["--gpus", "5"], ["--gpus '5'", "visible CUDA"]),
    (["--device", "tpu"], ["device='tpu'"]),
    (["--stop", "99999999999"], ["stop=99999999999", "--stop", "64000"]),
    (["--seeds", "0"], ["seeds=0", "--seeds"]),
    (["--threads", "0"], ["threads=0", "--threads"]),
    (["--replicates", "0"], ["replicates=0", "--replicates"]),
])
@pytest.mark.parametrize("mode", [[], ["--print-commands"]])
def test_experiment_checks_its_flags_also_when_it_only_prints_commands(argv, words, mode, capsys, tmp_path):
    if "5" in argv:
        import torch
        if torch.cuda.device_count() > 5:
            pytest.skip("this machine has a GPU 5")
    assert _rc(exp_cli.main, ["table2", "--data", str(tmp_path), *argv, *mode]) == 2
    _one_line(capsys, words)


def test_collect_without_run_folders_is_refused_not_an_empty_table(capsys, tmp_path):
    assert _rc(exp_cli.main, ["table1", "--collect", "--out", str(tmp_path / "typo")]) == 2
    _one_line(capsys, ["--collect", "no run folders", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_the_collect_hint_printed_after_the_commands_runs(capsys, tmp_path):
    argv = ["depth", "--rows", "resnet20", "--data", str(tmp_path), "--out", str(tmp_path / "x"),
            "--gpus", "none", "--print-commands"]
    assert exp_cli.main(argv) == 0
    hint = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("# then:")]
    assert len(hint) == 1
    then = shlex.split(hint[0][len("# then:"):])
    assert "--print-commands" not in then and then[-1] == "--collect"
    # the hint parses as a command the runner takes (it does not exit 2 on the modes)
    assert "--print-commands" not in then and then[:4] == ["python", "-m", "gradflow", "experiment"]
    rc = _rc(exp_cli.main, then[4:])
    assert rc != 2 or "not allowed" not in capsys.readouterr().err


def test_gradflow_train_is_the_function_after_every_submodule_is_imported():
    import importlib
    import pkgutil

    import gradflow
    from gradflow.training import train as the_function
    for info in pkgutil.walk_packages(gradflow.__path__, "gradflow."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as e:        # an optional dependency (transformers, lightning) missing here
            assert "gradflow" not in str(e), e
    assert gradflow.train is the_function and callable(gradflow.train)


def test_train_refuses_synthetic_with_data(capsys, tmp_path):
    """--synthetic used to train on generated data and ignore --data without a word."""
    from gradflow.cli import train as train_cli
    argv = ["--synthetic", "--data", str(tmp_path), "--stop", "2", "--out-dir", str(tmp_path / "runs")]
    assert _rc(train_cli.cli, argv) == 2
    _one_line(capsys, ["--synthetic", "--data", "one of them"])
    assert not (tmp_path / "runs").exists()
