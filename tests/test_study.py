"""bnll_lightning/study.py and the study command: runs on a tiny model, resume, held-out rows, bad input."""

import csv
import json

import pytest
import yaml

from bnll_lightning import study
from bnll_lightning.cli import main
from bnll_lightning.compare import StudyError
from bnll_lightning.data import SFTDataModule

GENERATION_EVAL = {"class_path": "bnll_lightning.callbacks.GenerationEval",
                   "init_args": {"max_new_tokens": 4, "batch_size": 8}}  # fmt: skip


def job(tmp_path, model_dir, callbacks=(GENERATION_EVAL,), **data):
    """A user's job config: the tiny model on a built-in task (or ``data``), 2 steps."""
    config = {
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "callbacks": list(callbacks)},
        "model": {"model": model_dir},
        "data": {"train": "builtin:reverse3", "num_train": 16, "batch_size": 4, **data},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_study_end_to_end_and_an_interrupted_study_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["study", "--config", job(tmp_path, tiny_model_dir), "--objectives", "nll", "bnll_lightning.objectives.DFT",
            "--seeds", "2", "--val_rows", "6", "--out", str(out), "--bootstrap", "200"]
    fits, real_fit = [], study.fine_tune

    def stopped_fit(*args, **kwargs):  # the pilot, nll seed 0, DFT seed 0, then the process is "killed"
        fits.append(args[2])
        if len(fits) == 4:
            raise RuntimeError("killed")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(study, "fine_tune", stopped_fit)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    first = read(out / "study.csv")
    assert [(r["objective"], r["seed"]) for r in first] == [("base", ""), ("nll", "0"), ("DFT", "0")]
    assert fits == [2, 2, 2, 2] and "[study] pilot: 2 training steps" in capsys.readouterr().err

    monkeypatch.setattr(study, "fine_tune", real_fit)
    main(argv)
    captured = capsys.readouterr()
    assert "[study] 2 of the 2 runs left to do (2 in the CSV)" in captured.err and "pilot" not in captured.err
    rows = read(out / "study.csv")
    assert rows[:3] == first  # finished runs are kept as they were, not redone
    assert sorted((r["objective"], r["seed"]) for r in rows) == sorted(
        [("base", ""), ("nll", "0"), ("nll", "1"), ("DFT", "0"), ("DFT", "1")])
    assert len({r["config"] for r in rows}) == 1
    for r in rows:
        assert r["n"] == "6" and len(r["items"]) == 6 and int(r["correct"]) == r["items"].count("1")
        assert r["steps"] == ("0" if r["objective"] == "base" else "2")
    assert json.loads(rows[1]["objective_config"])["objective"]["class_path"] == "bnll_lightning.objectives.NLL"
    assert rows[1]["alpha_mean"] == "0.0" and rows[2]["alpha_mean"] == ""  # NLL is f_α at α = 0; DFT has no α

    table = (out / "study.md").read_text()
    assert "| objective | seeds | accuracy [95 % CI] | Δ vs nll [95 % CI]" in table
    assert "| base model (not fine-tuned) |" in table and "| DFT | 2 |" in table and "| nll | 2 |" in table
    assert table.splitlines()[0] in captured.out  # printed too
    recommendation = (out / "recommendation.yaml").read_text()
    assert "# verdict: " in recommendation and "6 held-out rows" in recommendation
    assert yaml.safe_load(recommendation)["model"]["objective"]["class_path"].startswith("bnll_lightning.objectives.")
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")

    main(argv)  # complete: nothing to run
    assert "0 of the 0 runs left to do (4 in the CSV)" in capsys.readouterr().err
    assert read(out / "study.csv") == rows


@pytest.mark.parametrize("case", ["unknown objective", "val set too small", "no checker"])
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, tiny_model_dir, capsys):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "response": str(i + 1)}) + "\n" for i in range(20)))
    val.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "response": str(i + 1)}) + "\n" for i in range(50, 55)))
    argv, expected = {
        "unknown objective": (["--config", job(tmp_path, tiny_model_dir), "--objectives", "nll", "nosuch"],
                              "unknown objective 'nosuch'"),
        "val set too small": (["--config", job(tmp_path, tiny_model_dir), "--data.val", str(val),
                               "--val_rows", "8"], f"--val_rows 8: data.val ({val}) gives only 5 usable rows"),
        "no checker": (["--config", job(tmp_path, tiny_model_dir, callbacks=(), train=str(train)), "--val_rows", "2"],
                       "the job has no answer checker"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["study", *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bnll_lightning: study error: ") and expected in last
    assert not (tmp_path / "out" / "study.csv").exists()


def test_objective_names_resolve_to_overlays_or_class_paths(tmp_path):
    assert study.objective_args("dft")[-1].endswith("configs/objectives/dft.yaml")
    assert study.objective_args("bnll_lightning.objectives.EAFT") == [
        "--model.objective=bnll_lightning.objectives.EAFT", "--model.alpha_controller=null",
        "--model.warm_start_batches=0"]
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("model:\n  objective:\n    class_path: bnll_lightning.objectives.NLL\n")
    assert study.objective_args(str(overlay))[-1] == str(overlay) and study.objective_key(str(overlay)) == "mine"
    for bad in ("nosuch", "bnll_lightning.alpha.AdaptiveAlpha", "no.such.module.Class"):
        with pytest.raises(StudyError, match="unknown objective"):
            study.objective_args(bad)


def test_held_out_rows_are_never_training_rows(tokenizer, tmp_path):
    data = SFTDataModule(train="builtin:reverse3", num_train=64, num_val=8, tokenizer=tokenizer)
    data, rows = study.held_out(data, 40)  # more than num_val: the task's validation stream gives them
    assert len(rows) == 40 and data.num_val == 40
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in data.raw_rows("train")}

    lines = [json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) + "\n" for i in range(100)]
    (tmp_path / "rows.jsonl").write_text("".join(lines))
    data = SFTDataModule(train=str(tmp_path / "rows.jsonl"), val_fraction=0.05, tokenizer=tokenizer)
    data, rows = study.held_out(data, 20)  # 5 % gives 5: a larger fraction is held out
    assert len(rows) == 20 and len(data.raw_rows("train")) <= 80
    with pytest.raises(StudyError, match="fewer than half"):
        study.held_out(SFTDataModule(train=str(tmp_path / "rows.jsonl"), tokenizer=tokenizer), 60)

    (tmp_path / "val.jsonl").write_text("".join(lines[:3]))  # rows that are training rows too
    data = SFTDataModule(train=str(tmp_path / "rows.jsonl"), val=str(tmp_path / "val.jsonl"), tokenizer=tokenizer)
    with pytest.raises(StudyError, match="3 of the 3 held-out rows ask a prompt that a training row asks"):
        study.held_out(data, 3)


def test_runs_csv_appends_reads_typed_and_widens_an_old_header(tmp_path):
    path = tmp_path / "runs.csv"
    study.RunsCSV(path, ("config", "seed"), integer=("seed",)).append({"config": "a", "seed": 1})
    table = study.RunsCSV(path, ("config", "seed", "accuracy"), numeric=("accuracy",), integer=("seed",))
    table.append({"config": "b", "seed": None, "accuracy": 0.5})
    assert table.read() == [{"config": "a", "seed": 1, "accuracy": None}, {"config": "b", "seed": None, "accuracy": 0.5}]
    assert table.read("b") == [{"config": "b", "seed": None, "accuracy": 0.5}]
    with pytest.raises(ValueError, match="not a prefix"):
        study.RunsCSV(path, ("other",)).append({"other": 1})
    assert study.config_key({"f": study.fine_tune}, 1) == study.config_key({"f": study.fine_tune}, 1) != study.config_key(
        {"f": study.answer}, 1)
