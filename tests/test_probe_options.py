"""Options checked against each other: one that has no effect on its model is refused, naming what it needs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradflow.errors import GradflowError
from gradflow.probe import ProbeConfig, parse_compare

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.mark.parametrize("options,want", [
    (dict(scale=0.5), "add --shortcut scale"),
    (dict(scale_branch=True), "add --shortcut scale"),
    (dict(gate_bias=3.0), "add --shortcut exclusive_gate"),
    (dict(shortcut="scale", gate_bias=3.0), "add --shortcut exclusive_gate"),
    (dict(dropout=0.3), "add --shortcut dropout"),
])
def test_options_without_effect_are_refused(options, want):
    with pytest.raises(GradflowError, match=want):
        ProbeConfig(model="resnet110", options=options).variants()


def test_options_with_effect_pass_and_transformer_rules_come_from_their_config():
    for options in (dict(shortcut="scale", scale=0.5), dict(shortcut="shortcut_gate", gate_bias=-6.0),
                    dict(shortcut="dropout", dropout=0.3), dict(unit="original")):
        ProbeConfig(model="resnet110", options=options).variants()
    ProbeConfig(model="gpt-tiny", options=dict(unit="skipinit", skip_init=0.1)).variants()
    with pytest.raises(GradflowError, match="unit='skipinit'"):
        ProbeConfig(model="gpt-tiny", options=dict(skip_init=0.1)).variants()
    # --compare: a variant's own option must apply to it; a base option must reach some variant
    ProbeConfig(model="resnet20", compare=parse_compare(["table1"])).variants()
    with pytest.raises(GradflowError, match="unit=original,scale=0.3"):
        ProbeConfig(model="resnet20", compare=parse_compare(["unit=original,scale=0.3"])).variants()
    with pytest.raises(GradflowError, match="every --compare variant sets its own"):
        ProbeConfig(model="resnet20", options=dict(gate_bias=3.0),
                    compare=parse_compare(["shortcut=exclusive_gate,gate_bias=-6"])).variants()


def test_cli_lambda_without_scale_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "gradflow.probe", "--model", "resnet110", "--lambda", "0.5",
                        "--out", str(out)], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--lambda" in err[0] and "add --shortcut scale" in err[0], err
    assert not out.exists()          # refused before any work
