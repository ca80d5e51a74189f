"""The figures CLI: files, captions that name the command and configuration, run folders."""
from __future__ import annotations

import json

from gradflow.cli.figures import figure_specs, main, table_configs


def test_every_table_1_and_2_variant_is_in_a_figure():
    names = {s.name for s in figure_specs()}
    assert {"table1_gradient_depth", "table2_resnet110_gradient_depth", "table2_resnet164_gradient_depth",
            "resnet1001_gradient_depth"} <= names
    assert len(table_configs("1")) == 16 and len(table_configs("2")) == 10
    deep = next(s for s in figure_specs() if s.name == "resnet1001_gradient_depth").configs
    assert [dict(c.options)["unit"] for c in deep] == ["original", "full_preact"]


def test_cli_writes_figures_and_captions(tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["--out", str(out), "--only", "table2_resnet110_cosine", "--batch", "2",
                 "--format", "png", "svg"]) == 0
    assert (out / "table2_resnet110_cosine.png").stat().st_size > 0
    assert (out / "table2_resnet110_cosine.svg").stat().st_size > 0
    caption = (out / "table2_resnet110_cosine.txt").read_text()
    for needle in ("command: python -m gradflow figures --out", "seed 0, batch 2", "torch:", "hardware:",
                   "create_model('resnet110', unit='full_preact')"):
        assert needle in caption, needle
    assert main(["--list"]) == 0
    assert "table1_gradient_depth" in capsys.readouterr().out


def test_cli_draws_run_folders_with_their_hardware(tmp_path):
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"model": "resnet20"}, "device": "cuda:0"}))
    rows = [dict(iteration=i, train_loss=1.0 / i, test_error=0.5 / i) for i in (1, 2, 3)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "figs"
    assert main(["--out", str(out), "--no-init", "--runs", str(run)]) == 0
    caption = (out / "training_curves.txt").read_text()
    assert str(run) in caption and "cuda:0" in caption
    assert main(["--out", str(out), "--no-init", "--runs", str(tmp_path / "nope")]) == 2
