"""bnll_lightning/study.py and the study command: runs on a tiny model, resume, held-out rows, bad input; a job on
several devices runs a process per run."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from bnll_lightning import study
from bnll_lightning.cli import main
from bnll_lightning.compare import StudyError
from bnll_lightning.data import SFTDataModule

GENERATION_EVAL = {"class_path": "bnll_lightning.callbacks.GenerationEval",
                   "init_args": {"max_new_tokens": 4, "batch_size": 8}}  # fmt: skip


def job(tmp_path, model_dir, callbacks=(GENERATION_EVAL,), trainer=None, name="job.yaml", **data):
    """A user's job config (``name`` in ``tmp_path``): the tiny model on a built-in task (or ``data``), 2 steps
    (``trainer``: more settings)."""
    config = {
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "callbacks": list(callbacks), **(trainer or {})},
        "model": {"model": model_dir},
        "data": {"train": "builtin:reverse3", "num_train": 16, "batch_size": 4, **data},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# The job as demo.yaml has it: checkpoints on, every step, and a last.ckpt; a study run keeps none of them.
CHECKPOINTS = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"every_n_train_steps": 1, "save_last": "link"}}  # fmt: skip


def test_study_end_to_end_and_an_interrupted_study_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever a run writes to the working directory would be found below
    out = tmp_path / "out"
    config = job(tmp_path, tiny_model_dir, callbacks=(GENERATION_EVAL, CHECKPOINTS), trainer={"enable_checkpointing": True})
    argv = ["study", "--config", config, "--objectives", "nll", "bnll_lightning.objectives.DFT",
            "--seeds", "2", "--val_rows", "6", "--out", str(out), "--bootstrap", "200"]
    fits, real_fit = [], study.fine_tune

    def stopped_fit(*args, **kwargs):  # nll seed 0, DFT seed 0, then the process is "killed"
        fits.append(args[2])
        if len(fits) == 3:
            raise RuntimeError("killed")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(study, "fine_tune", stopped_fit)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    first = read(out / "study.csv")
    assert [(r["objective"], r["seed"]) for r in first] == [("base", ""), ("nll", "0"), ("DFT", "0")]
    err = capsys.readouterr().err
    assert fits == [2, 2, 2]  # no pilot: the time left is projected from the runs themselves
    assert "runs left to do (0 in the CSV); the time left is projected after the first run" in err
    assert "[study] 3 runs left: ~" in err and " s per run (measured)" in err

    monkeypatch.setattr(study, "fine_tune", real_fit)
    main(argv)
    captured = capsys.readouterr()
    assert "[study] 2 of the 2 runs left to do (2 in the CSV); projected " in captured.err
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

    # Each run's answers beside the CSV (what tells wrong answers from a checker that misreads them), and
    # nothing else: no checkpoint, no export, no logs, though the job has checkpointing on.
    answers = out / "answers" / rows[0]["config"]
    assert sorted(p.name for p in answers.iterdir()) == ["DFT-seed0.jsonl", "DFT-seed1.jsonl", "base.jsonl",
                                                          "nll-seed0.jsonl", "nll-seed1.jsonl"]  # fmt: skip
    for r in rows:
        name = "base" if r["objective"] == "base" else f"{r['objective']}-seed{r['seed']}"
        kept = [json.loads(line) for line in (answers / f"{name}.jsonl").read_text().splitlines()]
        assert "".join("1" if a["correct"] else "0" for a in kept) == r["items"]
        assert all({"prompt", "prediction", "answer", "correct"} <= set(a) for a in kept)
    assert f"answers/{rows[0]['config']}/ (each run's answers)" in captured.out
    assert "; on disk " in captured.err and str(answers / "nll-seed1.jsonl") in captured.err
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("job.yaml",)]
    assert {p.suffix for p in left} == {".csv", ".md", ".yaml", ".png", ".jsonl"}
    assert sum(p.stat().st_size for p in left) < 200_000


@pytest.mark.parametrize("case", ["unknown objective", "val set too small", "no checker", "several nodes"])
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
        "several nodes": (["--config", job(tmp_path, tiny_model_dir, trainer={"strategy": "ddp", "num_nodes": 2},
                                           name="nodes.yaml")],
                          "the job's trainer has 2 nodes: add --trainer.num_nodes 1"),
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


DDP = {"strategy": "ddp", "devices": 2, "accumulate_grad_batches": 2}  # 2 CPU processes (gloo)


def pairs(command):
    """``python -m bnll_lightning <subcommand> --key value ...`` as {key: value}."""
    assert command[1:3] == ["-m", "bnll_lightning"]
    return dict(zip(command[4::2], command[5::2]))


def fake_process(commands, fail=None):
    """subprocess.run for the study's runs: records each command and writes what the run would (its trace,
    every held-out row answered, even rows right); the run whose config file is ``fail``.yaml fails instead."""

    def run(command, stdout, stderr):
        commands.append(command)
        args = pairs(command)
        if Path(args["--config"]).name == f"{fail}.yaml":
            stdout.write("bnll_lightning: config error: something the run refused\n")
            return subprocess.CompletedProcess(command, 2)
        run_dir, steps = Path(args["--trainer.default_root_dir"]), int(args.get("--trainer.max_steps", 0))
        (run_dir / "trace.json").write_text(json.dumps({"steps": steps, "train_seconds": 1.0, "eval_seconds": 0.5,
                                                        "alpha_mean": None, "alpha_end": None}))
        if args["--trainer.limit_val_batches"] != "0":
            (run_dir / "predictions").mkdir()
            n = len(Path(args["--data.val"]).read_text().splitlines())
            (run_dir / "predictions" / f"step_{steps}.jsonl").write_text("".join(
                json.dumps({"index": i, "prompt": f"p{i}", "answer": "a", "correct": i % 2 == 0}) + "\n"
                for i in range(n)))
        return subprocess.CompletedProcess(command, 0)

    return run


def test_a_job_on_several_devices_runs_a_process_per_run_and_a_failed_one_exits_2(tmp_path, tiny_model_dir,
                                                                                      monkeypatch, capsys):
    out, commands = tmp_path / "out", []
    argv = ["study", "--config", job(tmp_path, tiny_model_dir, trainer=DDP), "--objectives", "nll",
            "bnll_lightning.objectives.DFT", "--seeds", "1", "--max_steps", "3", "--val_rows", "5", "--out", str(out),
            "--bootstrap", "100", "--checker", "exact"]
    monkeypatch.setattr(study.subprocess, "run", fake_process(commands, fail="DFT"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    log = out / "runs" / "seed_0" / "DFT" / "study.log"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bnll_lightning: study error: run DFT seed 0 failed (exit 2): bnll_lightning: config error: something the "
        f"run refused; log: {log}")
    assert log.read_text().startswith(f"{commands[-1][0]} -m bnll_lightning fit --config ")  # the command, to rerun
    rows = read(out / "study.csv")
    assert [(r["objective"], r["seed"], r["items"]) for r in rows] == [("base", "", "10101"), ("nll", "0", "10101")]
    assert list(rows[0]) == list(study.STUDY_FIELDS) and rows[1]["correct"] == "3" and rows[1]["steps"] == "3"

    work = out / "work"
    assert [c[3] for c in commands] == ["validate", "fit", "fit"]  # base, nll, DFT: no pilot
    base, nll = (pairs(c) for c in commands[:2])
    assert base["--trainer.default_root_dir"] == str(out / "runs" / "base")
    answers = out / "answers" / rows[0]["config"] / "nll-seed0.jsonl"  # the run's predictions, beside the CSV's
    assert answers.read_text() == (log.parent.parent / "nll" / "predictions" / "step_3.jsonl").read_text()
    assert nll["--config"] == str(work / "nll.yaml") and nll["--trainer.default_root_dir"] == str(log.parent.parent / "nll")
    assert {k: nll[k] for k in ("--seed_everything", "--data.seed", "--trainer.max_steps", "--trainer.val_check_interval",
                                "--trainer.check_val_every_n_epoch", "--trainer.logger", "--trainer.enable_checkpointing",
                                "--data.noise", "--data.max_rows")} == {
        "--seed_everything": "0", "--data.seed": "0", "--trainer.max_steps": "3", "--trainer.val_check_interval": "6",
        "--trainer.check_val_every_n_epoch": "null", "--trainer.logger": "false",
        "--trainer.enable_checkpointing": "false", "--data.noise": "0", "--data.max_rows": "null"}  # fmt: skip
    assert json.loads(nll["--trainer.callbacks"]) == [
        {"class_path": "bnll_lightning.study.RunTrace", "init_args": {"export": False}},
        {"class_path": "bnll_lightning.callbacks.GenerationEval",
         "init_args": {"checker": "exact", "max_new_tokens": 4, "batch_size": 8}}]  # fmt: skip
    config = yaml.safe_load((work / "nll.yaml").read_text())  # the job with the objective's overlay
    assert config["model"]["objective"]["class_path"] == "bnll_lightning.objectives.NLL" and "objectives" not in config
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["devices"] == 2
    val = [json.loads(line) for line in Path(nll["--data.val"]).read_text().splitlines()]
    train = [json.loads(line) for line in Path(nll["--data.train"]).read_text().splitlines()]
    assert len(val) == 5 and len(train) == 16 and not {r["prompt"] for r in val} & {r["prompt"] for r in train}

    commands.clear()
    monkeypatch.setattr(study.subprocess, "run", fake_process(commands))
    main(argv)  # the failed run again, nothing else (no base, no pilot)
    assert [pairs(c)["--config"] for c in commands] == [str(work / "DFT.yaml")]
    assert [(r["objective"], r["seed"]) for r in read(out / "study.csv")] == [("base", ""), ("nll", "0"), ("DFT", "0")]
    assert "| DFT | 1 |" in (out / "study.md").read_text()


def test_a_sharded_job_scores_each_run_by_evaluating_its_export_on_one_device(tmp_path):
    runs = study.SubprocessStudy({"nll": ""}, None, 1, True, ["nll"], [0], [{}] * 3, tmp_path, "key", max_steps=4,
                                 checker=None, max_new_tokens=6, batch_size=2)
    fit = pairs(runs.command("nll", 1))
    assert json.loads(fit["--trainer.callbacks"]) == [{"class_path": "bnll_lightning.study.RunTrace",
                                                       "init_args": {"export": True}}]  # no GenerationEval: it cannot
    run_dir = tmp_path / "runs" / "seed_1" / "nll"
    assert fit["--model.export_dir"] == str(run_dir / "hf_model") and fit["--trainer.limit_val_batches"] == "0"
    command = runs.evaluate_command("nll", 1, 4)
    assert command[3] == "evaluate" and "--checker" not in command  # auto, as GenerationEval's None
    evaluate = pairs(command)
    assert {k: evaluate[k] for k in ("--model.model", "--trainer.devices", "--trainer.strategy", "--temperature",
                                     "--max_new_tokens", "--output", "--data.seed")} == {
        "--model.model": str(run_dir / "hf_model"), "--trainer.devices": "1", "--trainer.strategy": "auto",
        "--temperature": "0", "--max_new_tokens": "6", "--output": str(run_dir / "predictions" / "step_4.jsonl"),
        "--data.seed": "1"}  # fmt: skip
    assert "--model.model" not in runs.evaluate_command("base", None, 0)  # the job's own model


def test_the_time_left_is_projected_from_the_runs_measured(tmp_path, capsys):
    now = [0.0]
    took = {"a": 30.0, "b": 20.0, "c": 22.0, "d": 18.0, "f": 10.0}  # the first run pays the process's warm-up

    def run(key):
        now[0] += took[key]
        return {"key": key}

    table = study.RunsCSV(tmp_path / "runs.csv", ("key",))
    ran = study.run_missing(list("abcde"), {"e"}, run, table, name="study", progress=False, clock=lambda: now[0])
    assert ran == 4 and [r["key"] for r in table.read()] == list("abcd")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[study]")]
    assert lines == ["[study] 4 of the 4 runs left to do (1 in the CSV); the time left is projected after the first run",
                     "[study] 3 runs left: ~90 s at ~30 s per run (measured)",  # the first run alone
                     "[study] 2 runs left: ~40 s at ~20 s per run (measured)",  # the runs after it
                     "[study] 1 run left: ~21 s at ~21 s per run (measured)"]  # fmt: skip
    assert study.projected_per_run([26.0, 18.0]) == 18.0 and study.duration(3 * 3600 + 5 * 60) == "3 h 05 min"

    study.run_missing(list("abcdef"), set("abcde"), run, table, name="study", per_run_seconds=150.0, progress=False)
    assert "1 of the 1 runs left to do (5 in the CSV); projected 2 min at ~150 s per run" in capsys.readouterr().err


FSDP2 = {"class_path": "bnll_lightning.strategies.FSDP2Strategy"}


@pytest.mark.slow  # 3 processes of 2 ranks each (FSDP2: and 2 of evaluate)
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_a_study_on_2_cpu_processes_trains_and_scores_in_processes_of_its_own(strategy, tmp_path, tiny_model_dir,
                                                                               monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    config = job(tmp_path, tiny_model_dir, trainer={**DDP, "strategy": strategy})
    argv = ["study", "--config", config, "--objectives", "nll", "--seeds", "1", "--val_rows", "4", "--out", str(out),
            "--bootstrap", "100"]
    main(argv)
    rows = read(out / "study.csv")
    assert [(r["objective"], r["seed"], r["steps"], r["n"]) for r in rows] == [("base", "", "0", "4"), ("nll", "0", "2", "4")]
    assert rows[1]["alpha_mean"] == "0.0" and float(rows[1]["train_mean_p_last"]) > 0 and len(rows[1]["items"]) == 4
    run = out / "runs" / "seed_0" / "nll"
    assert (run / "predictions" / "step_2.jsonl").is_file() and "x 2 processes" in (run / "study.log").read_text()
    assert not list(out.rglob("hf_model")) and not list(out.rglob("*.ckpt"))  # no export left, no checkpoint
    answers = out / "answers" / rows[1]["config"] / "nll-seed0.jsonl"
    assert answers.read_text() == (run / "predictions" / "step_2.jsonl").read_text()
    assert "| nll | 1 |" in capsys.readouterr().out

    monkeypatch.setattr(study.subprocess, "run", None)  # a rerun starts no process
    main(argv)
    assert "0 of the 0 runs left to do (1 in the CSV)" in capsys.readouterr().err and read(out / "study.csv") == rows
