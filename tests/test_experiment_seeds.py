"""--seeds N planning and resumption, on run folders made by hand (no training): a sweep with more
seeds reuses the folders of a sweep with fewer, skips what finished and resumes what has a checkpoint."""
import json

from gradflow.experiments import command_for, experiment_rows, make_scale, plan, run_state, select_rows


def _rows():
    return select_rows(experiment_rows("table2"), ["resnet110-original", "resnet164-full_preact"])


def test_more_seeds_extend_the_same_folders(tmp_path):
    one, three = plan(_rows(), 1, tmp_path), plan(_rows(), 3, tmp_path)
    assert [s.key for s in one] == ["table2-resnet110-original-seed0", "table2-resnet164-full_preact-seed0"]
    assert len(three) == 6 and {s.folder for s in one} <= {s.folder for s in three}
    assert [s.seed for s in three] == [0, 1, 2, 0, 1, 2]


def test_finished_skipped_interrupted_resumed_missing_started(tmp_path):
    scale = make_scale("laptop")
    specs = plan(_rows(), 3, tmp_path)
    cfg = lambda s: {"config": {**scale.fields(), "seed": s.seed, "model": s.row.model,
                                "model_options": {"width": 0.5}, "batch_size": 128}}
    done, halted, broken = specs[0], specs[1], specs[3]
    for s, status, ckpt in ((done, "ok", True), (halted, "interrupted", True), (broken, "running", False)):
        s.folder.mkdir(parents=True)
        (s.folder / "config.json").write_text(json.dumps(cfg(s)))
        (s.folder / "status.json").write_text(json.dumps({"status": status}))
        if ckpt:
            (s.folder / "checkpoint.pt").write_bytes(b"x")
    assert [run_state(s.folder) for s in (done, halted, broken, specs[2])] == \
        ["finished", "resumable", "broken", "missing"]
    assert command_for(done, scale, "DATA", False) is None
    resume = command_for(halted, scale, "DATA", False)
    assert resume[resume.index("--resume") + 1] == str(halted.folder) and "--preset" not in resume
    fresh = command_for(specs[2], scale, "DATA", False)
    assert fresh[fresh.index("--seed") + 1] == "2" and fresh[fresh.index("--run-name") + 1] == specs[2].key
    assert fresh[fresh.index("--stop") + 1] == "400"
