"""bnll_lightning/compare.py and the compare command: paired bootstrap, verdicts, runs read from prediction files."""

import json

import numpy as np
import pytest
import yaml

from bnll_lightning import compare
from bnll_lightning.cli import main

NLL = {"class_path": "bnll_lightning.objectives.NLL"}
DFT = {"class_path": "bnll_lightning.objectives.DFT"}


def write_run(root, label, seed, correct, *, objective=None, step=4, prompts=None, version=None):
    """A run directory as fit + GenerationEval leave it: predictions/step_N.jsonl and config.yaml."""
    run = root / label / f"version_{seed if version is None else version}"
    (run / "predictions").mkdir(parents=True)
    prompts = prompts or [f"question {i}" for i in range(len(correct))]
    with open(run / "predictions" / f"step_{step}.jsonl", "w") as f:
        for i, (ok, prompt) in enumerate(zip(correct, prompts)):
            f.write(json.dumps({"index": i, "sample": 0, "task": None, "prompt": prompt, "prediction": "x",
                                "answer": f"answer {i}", "correct": bool(ok), "new_tokens": 1}) + "\n")
    config = {"seed_everything": seed, "model": {"objective": objective, "alpha_controller": None}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_bootstrap_intervals_on_known_answers():
    rng = np.random.default_rng(0)
    same = (rng.random((3, 200)) < 0.5).astype(np.uint8)
    mean, lo, hi = compare.bootstrap(same, same.copy())
    assert mean == 0.0 and lo <= 0.0 <= hi
    right, wrong = np.ones((3, 200)), np.zeros((3, 200))
    assert compare.bootstrap(right, wrong)[1] > 0.0 and compare.bootstrap(wrong, right)[2] < 0.0
    a = (rng.random((3, 200)) < 0.4).astype(float)
    acc, lo, hi = compare.bootstrap(a)
    assert lo < acc < hi and 0.04 < hi - lo < 0.2  # about the binomial width of 600 answers
    with pytest.raises(ValueError):
        compare.bootstrap(np.zeros(5))
    assert [compare.verdict(x) for x in ((0.1, 0.05, 0.2), (-0.1, -0.2, -0.01), (0.0, -0.1, 0.1), None)] == [
        "better", "worse", "tied", "–"]


def test_summary_finds_the_best_and_its_ties_and_recommends_accordingly():
    n = 100

    def runs(k, seeds=(0, 1, 2)):
        return {s: np.array([1] * k + [0] * (n - k)) for s in seeds}

    c = compare.summarize({"nll": runs(30), "negprob": runs(60), "dft": runs(59), "alpha10": runs(5),
                           compare.BASE: {None: np.array([1] * 20 + [0] * 80)}}, resamples=500)
    assert c.best == "negprob" and set(c.tied) == {"negprob", "dft"} and c.reference == "nll"
    assert compare.verdict(c.vs_reference["negprob"]) == "better" and c.vs_reference["nll"] is None
    assert compare.verdict(c.vs_reference["alpha10"]) == "worse" and c.base[0] == pytest.approx(0.2)
    text = compare.recommendation(c, {"negprob": {"objective": {"class_path": "bnll_lightning.objectives.NegProb"}}})
    assert "verdict: negprob is better than nll" in text
    assert yaml.safe_load(text)["model"]["objective"]["class_path"].endswith("NegProb")
    table = compare.markdown(c)
    assert "| negprob | 3 | 0.600" in table and "tied with best" in table and "base model" in table

    tied = compare.summarize({"nll": runs(58), "dft": runs(60)}, resamples=500)
    text = compare.recommendation(tied, {"nll": {"objective": NLL}, "dft": {"objective": DFT}})
    assert "verdict: tied" in text and "keep nll" in text
    assert yaml.safe_load(text)["model"]["objective"] == NLL  # tied: the standard stays
    assert "One seed" not in compare.markdown(tied) + text

    once = compare.summarize({"nll": runs(30, seeds=(0,)), "dft": runs(60)}, resamples=200)
    assert "One seed for nll: those intervals hold item-to-item variation only" in compare.markdown(once)
    assert "# One seed for nll" in compare.recommendation(once)


def test_compare_identical_runs_are_tied(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for seed in range(3):
        correct = rng.random(40) < 0.5
        write_run(tmp_path / "runs", "NLL", seed, correct, objective=NLL)
        write_run(tmp_path / "runs", "DFT", seed, correct, objective=DFT)
    c = compare.summarize(compare.match_items([compare.read_run(p) for p in compare.find_runs(
        [tmp_path / "runs" / "NLL", tmp_path / "runs" / "DFT"])]), reference="NLL", resamples=500)
    mean, lo, hi = c.vs_reference["DFT"]
    assert mean == 0.0 and lo <= 0.0 <= hi and c.seeds["DFT"] == [0, 1, 2]


def test_compare_command_all_right_against_all_wrong(tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path / "runs", "NLL", seed, [False] * 30, objective=NLL)
        write_run(tmp_path / "runs", "DFT", seed, [True] * 30, objective=DFT)
    out = tmp_path / "out"
    main(["compare", str(tmp_path / "runs" / "NLL"), str(tmp_path / "runs" / "DFT" / "version_0"),
          str(tmp_path / "runs" / "DFT" / "version_1"), "--out", str(out), "--bootstrap", "500"])
    printed = capsys.readouterr().out
    # right on every item against wrong on every item: the interval of the difference excludes 0
    assert "| DFT | 2 | 1.000 [1.000, 1.000] | +1.000 [+1.000, +1.000]" in printed
    assert "verdict: DFT is better than NLL" in printed
    assert yaml.safe_load((out / "recommendation.yaml").read_text())["model"]["objective"] == DFT
    assert (out / "compare.md").read_text().startswith("| objective |")
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_compare_refuses_runs_scored_on_different_items(tmp_path, capsys):
    write_run(tmp_path, "NLL", 0, [True] * 10)
    write_run(tmp_path, "DFT", 0, [True] * 10, prompts=[f"other question {i}" for i in range(10)])
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "NLL"), str(tmp_path / "DFT"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scored on different items" in err and "item 0" in err
    write_run(tmp_path, "EAFT", 0, [True] * 12)
    with pytest.raises(compare.StudyError, match="10 items against 12"):
        compare.match_items([compare.read_run(tmp_path / "NLL" / "version_0"),
                             compare.read_run(tmp_path / "EAFT" / "version_0")])


def test_read_run_picks_the_last_step_and_says_what_is_missing(tmp_path):
    run = write_run(tmp_path, "NLL", 0, [True, False], step=2)
    with open(run / "predictions" / "step_10.jsonl", "w") as f:
        f.write(json.dumps({"index": 0, "prompt": "q", "answer": "a", "correct": False}) + "\n")
        f.write(json.dumps({"index": 1, "prompt": "q1", "answer": "a1", "correct": False}) + "\n")
    assert compare.read_run(run).path.name == "step_10.jsonl" and compare.read_run(run, step=2).scores.tolist() == [1, 0]
    with pytest.raises(compare.StudyError, match="no step_7.jsonl"):
        compare.read_run(run, step=7)
    with pytest.raises(compare.StudyError, match="no predictions"):
        compare.find_runs([tmp_path / "nothing"])
    with open(run / "predictions" / "step_11.jsonl", "w") as f:
        f.write(json.dumps({"index": 3, "prompt": "q", "answer": "a", "correct": True}) + "\n")
    with pytest.raises(compare.StudyError, match="partial"):
        compare.read_run(run)


def test_the_checkpoints_of_compared_runs_are_found_and_deleted_only_when_asked(tmp_path):
    runs = [write_run(tmp_path, "NLL", seed, [1, 0], objective=NLL) for seed in (0, 1)]
    (runs[0] / "checkpoints").mkdir()
    (runs[0] / "checkpoints" / "step=4.ckpt").write_bytes(b"x" * 3000)
    (runs[0] / "checkpoints" / "last.ckpt").symlink_to(runs[0] / "checkpoints" / "step=4.ckpt")
    (runs[0] / "hf_model").mkdir()
    read = [compare.read_run(run) for run in compare.find_runs([tmp_path / "NLL"])]
    found = compare.checkpoints_of(read)
    assert found == {runs[0] / "checkpoints": 3000}  # the run without checkpoints has nothing to find
    assert (runs[0] / "checkpoints").is_dir()  # finding deletes nothing
    assert compare.delete_checkpoints(found) == 3000
    assert not (runs[0] / "checkpoints").exists() and (runs[0] / "hf_model").is_dir()
    assert [compare.read_run(run).scores.tolist() for run in runs] == [[1.0, 0.0], [1.0, 0.0]]  # still compared


def test_the_compare_command_says_what_checkpoints_hold_and_deletes_them_when_asked(tmp_path, capsys):
    runs = [write_run(tmp_path / "runs", "NLL", seed, [True, False], objective=NLL) for seed in (0, 1)]
    (runs[1] / "checkpoints").mkdir()
    (runs[1] / "checkpoints" / "last.ckpt").write_bytes(b"x" * 2048)
    command = ["compare", str(tmp_path / "runs" / "NLL"), "--out", str(tmp_path / "out"), "--bootstrap", "100"]
    main(command)
    assert "checkpoints/ hold 2.0 kB" in capsys.readouterr().out and (runs[1] / "checkpoints").is_dir()
    main([*command, "--delete_checkpoints"])
    assert "deleted the checkpoints/ of 1 runs: 2.0 kB freed" in capsys.readouterr().out
    assert not (runs[1] / "checkpoints").exists()
