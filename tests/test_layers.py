"""The import layers the README draws: reading a run never imports the trainer.

Two checks, each independent of the other: a static one (every ``import`` statement in the
source, including those inside functions, parsed with ``ast``) and a live one (a fresh
interpreter that imports the probe, the lesion study and the figures and reads a checkpoint
through the probe, then lists ``sys.modules``).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradflow

ROOT = Path(gradflow.__file__).parent
# the faces and libraries below or beside the trainer: none may import gradflow.training
NOT_TRAINING = ["probe", "tracing", "theory", "plot", "runs", "utils", "data", "models", "errors.py",
                "experiments/lesion.py", "experiments/xiong.py", "cli/args.py", "cli/probe.py", "cli/figures.py",
                "cli/paths.py", "cli/lesion.py", "cli/xiong.py"]


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``, at any depth."""
    package = list(path.relative_to(ROOT.parent).parts[:-1])   # a module's package, or __init__'s own
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, target)] + [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def test_the_scan_sees_relative_and_local_imports():
    # the lesion command reads checkpoints inside a function: the scan must see it
    names = {m for _, m in imported(ROOT / "cli" / "lesion.py")}
    assert "gradflow.runs.checkpoint.load_checkpoint" in names and "gradflow.errors" in names
    names = {m for _, m in imported(ROOT / "training" / "loop.py")}
    assert "gradflow.training.steps" in names and "gradflow.runs.checkpoint" in names


def test_nothing_below_the_trainer_imports_it():
    files = []
    for entry in NOT_TRAINING:
        p = ROOT / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert len(files) > 30
    bad = [f"{f.relative_to(ROOT.parent)}:{line} imports {name}" for f in files for line, name in imported(f)
           if name == "gradflow.training" or name.startswith("gradflow.training.")]
    assert not bad, "\n".join(bad)


def test_no_library_package_imports_the_command_lines():
    """gradflow.cli parses flags and prints; the library below it (the trainer included) never imports it."""
    entry_points = {ROOT / "__main__.py", *ROOT.glob("*/__main__.py")}   # `python -m gradflow.probe` is a CLI
    files = [f for f in sorted(ROOT.rglob("*.py")) if "cli" not in f.relative_to(ROOT).parts[:1]
             and f not in entry_points]
    assert len(files) > 60 and ROOT / "training" / "steps.py" in files
    bad = [f"{f.relative_to(ROOT.parent)}:{line} imports {name}" for f in files for line, name in imported(f)
           if name == "gradflow.cli" or name.startswith("gradflow.cli.")]
    assert not bad, "\n".join(bad)


def test_tracing_knows_units_by_protocol_and_calls_theory_late():
    # tracing never imports the zoo (units are found by protocol) and imports theory only inside a
    # function (tr.summary()); the registry never imports the zoo (gradflow/__init__.py does, once)
    files = sorted((ROOT / "tracing").rglob("*.py"))
    zoo = [f"{f.name}:{line} {name}" for f in files for line, name in imported(f) if name.startswith("gradflow.models")]
    assert not zoo, zoo
    top = [f"{f.name}:{node.lineno}" for f in files for node in ast.parse(f.read_text()).body
           if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
               name.startswith("gradflow.theory") for line, name in imported(f) if line == node.lineno)]
    assert not top, top
    assert not [n for _, n in imported(ROOT / "models" / "registry.py") if n.startswith("gradflow.models.")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_at_module_level():
    # imports run when a module loads (not those inside functions) form no cycle: every module can be
    # imported first, and a reader finds a module's dependencies below it
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        me = _module_name(f)
        deps = set()
        top = {n.lineno for n in ast.parse(f.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for line, name in imported(f):
            if line in top and name in modules and name != me and not me.startswith(name + "."):
                deps.add(name)
        graph[me] = deps
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_probe_lesion_and_figures_read_a_checkpoint_without_the_trainer(tmp_path):
    from gradflow.runs.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = gradflow.create_model("resnet20", unit="original")
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": "resnet20", "options": {"unit": "original"},
                                        "model_state": model.state_dict()})
    code = (
        "import sys, torch, gradflow\n"
        "import gradflow.probe.run, gradflow.experiments.lesion, gradflow.cli.paths, gradflow.cli.figures, gradflow.plot\n"
        "import gradflow.tracing.paths.components, gradflow.theory, gradflow.tracing, gradflow.cli.probe, gradflow.runs.read\n"
        "from gradflow.probe import build_model\n"
        f"built = build_model('resnet1001', {{}}, 0, checkpoint={str(tmp_path / 'checkpoint.pt')!r})\n"
        f"model, info = gradflow.load_checkpoint({str(tmp_path)!r})\n"
        "total = lambda m: float(sum(p.detach().double().sum() for p in m.parameters()))\n"
        "print(info['model'], total(built.module), total(model))\n"
        "print(sorted(m for m in sys.modules if m.startswith('gradflow.training')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    name, *totals = r.stdout.splitlines()[0].split()
    want = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert name == "resnet20" and all(abs(float(t) - want) < 1e-6 for t in totals), (r.stdout, want)
    assert r.stdout.splitlines()[1] == "[]"


def test_the_trainer_reexports_the_one_reader():
    from gradflow import runs, training
    from gradflow.runs import checkpoint
    assert training.load_checkpoint is checkpoint.load_checkpoint is gradflow.load_checkpoint is runs.load_checkpoint


def test_the_table_reader_and_the_trainer_read_one_log_format(tmp_path):
    # a run still writing: two whole rows, then half a line; both readers keep the two rows, and say so
    import json

    from gradflow.runs.read import read_log_table
    from gradflow.runs.log import read_log
    rows = [dict(iteration=10, train_loss=2.25, test_error=None), dict(iteration=20, train_loss=1.5, test_error=0.5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 3')
    with pytest.warns(UserWarning, match="half-written last line"):
        assert read_log(tmp_path) == rows
    with pytest.warns(UserWarning, match="half-written last line"):
        table = read_log_table(tmp_path)
    assert table["iteration"].tolist() == [10, 20] and table["train_loss"].tolist() == [2.25, 1.5]
