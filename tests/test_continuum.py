"""benchmarks/continuum.py: the continuum study (held-out items, seeds, paired bootstrap, resume)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common as C  # noqa: E402
from benchmarks import continuum  # noqa: E402

QUICK_TASKS = continuum.QUICK["tasks"]
QUICK_SEEDS = continuum.QUICK["seeds"]


def _study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "continuum.py"), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` study as a user runs it (a subprocess: the script sets torch's thread count)."""
    out = tmp_path_factory.mktemp("continuum")
    proc = _study(out, "--append", "--docs", str(out / "benchmarks.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_quick_study_writes_every_run_with_its_items(quick):
    out, _ = quick
    rows = continuum.read_csv(str(out / "continuum.csv"))
    expected = {(t, continuum.BASE, None) for t in QUICK_TASKS}
    expected |= {(t, k, s) for t in QUICK_TASKS for k in continuum.OBJECTIVE_KEYS for s in range(QUICK_SEEDS)}
    assert sorted(map(str, ((r["task"], r["objective"], r["seed"]) for r in rows))) == sorted(map(str, expected))
    assert len({r["config"] for r in rows}) == 1
    for r in rows:
        assert r["n"] == continuum.QUICK["num_eval"] == len(r["items"]) and set(r["items"]) <= {"0", "1"}
        assert r["correct"] == r["items"].count("1") and r["accuracy"] == pytest.approx(r["correct"] / r["n"])
        if r["objective"] == continuum.BASE:
            assert 0.0 <= r["base_mean_p"] <= 1.0 and r["steps"] == 0
            continue
        assert r["steps"] == continuum.QUICK["steps"]  # same budget for every objective
        # Noise: round(0.3 x 4 rows) = 1 corrupted training answer on the noisy task, none elsewhere.
        assert r["noisy_rows"] == (1 if r["task"] == "successor_noisy" else 0)
    runs = {(r["objective"], r["seed"]): r for r in rows if r["task"] == "reverse3"}
    assert [runs[(k, 0)]["alpha_mean"] for k in ("nll", "negprob", "alpha10")] == [0.0, 1.0, 10.0]
    assert runs[("linear", 0)]["alphas"] == "0.000;0.500"  # LinearAlpha 0 -> 1 over the 2 steps
    assert 0.0 <= runs[("adaptive", 0)]["alpha_mean"] <= 1.0  # the controller's mean α, read from the run


@pytest.mark.slow
def test_quick_study_writes_tables_plot_and_docs(quick):
    out, proc = quick
    text = (out / "continuum.md").read_text()
    assert "Δ vs NLL" in text and "Δ vs best static" in text and "Hit rate" in text
    headers, table = C.parse_markdown_table(text)
    assert headers[:3] == ["task (role)", "objective", "accuracy [95 % CI]"]
    assert len(table) == len(QUICK_TASKS) * (1 + len(continuum.OBJECTIVE_KEYS))
    assert "| reverse3 (report) |" in proc.stdout  # the table is printed too
    docs = (out / "benchmarks.md").read_text()
    assert f"- command: `python benchmarks/continuum.py --quick --out {out} --append --docs" in docs
    assert "- machine: " in docs and "held-out" in docs
    assert (out / "continuum.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_rerun_skips_finished_runs_and_an_interrupted_study_continues(quick, tmp_path):
    out, _ = quick
    work = tmp_path / "again"
    work.mkdir()
    lines = (out / "continuum.csv").read_text().splitlines(keepends=True)
    (work / "continuum.csv").write_text("".join(lines[:-3]))  # as if stopped 3 runs before the end
    proc = _study(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of the 3 runs left to do" in proc.stderr
    again = list(csv.DictReader(open(work / "continuum.csv", encoding="utf-8")))
    assert len(again) == len(lines) - 1  # the 3 missing runs were run, nothing twice
    keys = [(r["task"], r["objective"], r["seed"]) for r in again]
    assert len(set(keys)) == len(keys)
    proc = _study(work)  # complete: nothing to run
    assert proc.returncode == 0 and "0 of the 0 runs left to do" in proc.stderr
    assert len(list(csv.DictReader(open(work / "continuum.csv", encoding="utf-8")))) == len(again)


@pytest.mark.slow
def test_the_validation_aware_controller_without_validation_runs_as_v3(quick, tmp_path):
    """This harness has no validation split: PlateauAlpha falls back to v3, run for run."""
    out, _ = quick
    (tmp_path / "continuum.csv").write_text((out / "continuum.csv").read_text())
    proc = _study(tmp_path, "--objectives", "plateau_v3_best", "--tasks", "reverse3", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["objective"]: r for r in continuum.read_csv(str(tmp_path / "continuum.csv"))
            if r["task"] == "reverse3" and r["seed"] == 0}  # fmt: skip
    plateau, v3 = runs["plateau_v3_best"], runs["adaptive_learn"]
    assert plateau["items"] == v3["items"] and plateau["alphas"] == v3["alphas"]
    assert plateau["train_mean_p_last"] == pytest.approx(v3["train_mean_p_last"], abs=1e-6)


def test_no_evaluation_item_is_ever_trained_on():
    import argparse

    args = argparse.Namespace(num_eval=200)
    for task in continuum.STUDY_TASKS.values():
        held_out = continuum.eval_rows(task, args.num_eval)
        prompts = {r["prompt"] for r in held_out}
        assert len(prompts) == 200 and all(r["task"] == task.task for r in held_out)
        for seed in range(3):
            train = continuum.train_rows(task, 128, seed, prompts)
            assert len(train) == 128 and not prompts & {r["prompt"] for r in train}
        assert held_out == continuum.eval_rows(task, args.num_eval)  # the same items for every run


def test_bootstrap_intervals_on_known_answers():
    rng = np.random.default_rng(0)
    same = (rng.random((3, 200)) < 0.5).astype(np.uint8)
    mean, lo, hi = continuum.bootstrap(same, same.copy())
    assert mean == 0.0 and lo <= 0.0 <= hi  # identical runs: the interval holds 0
    right, wrong = np.ones((3, 200), np.uint8), np.zeros((3, 200), np.uint8)
    mean, lo, hi = continuum.bootstrap(right, wrong)
    assert mean == 1.0 and lo > 0.0  # right on every item against wrong on every item: excludes 0
    assert continuum.bootstrap(wrong, right)[2] < 0.0
    # A real but modest paired difference (b = a with 30 extra items right) is found; the accuracy
    # interval of one array covers its own mean and has about the binomial width.
    a = (rng.random((3, 200)) < 0.4).astype(np.uint8)
    b = a.copy()
    b[:, :30] = 1
    diff = continuum.bootstrap(b, a)
    assert diff[1] > 0.0 and diff[1] <= diff[0] <= diff[2]
    acc, lo, hi = continuum.bootstrap(a)
    assert lo < acc < hi and 0.04 < hi - lo < 0.2
    with pytest.raises(ValueError):
        continuum.bootstrap(np.zeros(5))


def _rows(task, accuracies, seeds=3, n=100, base=0.6, mean_p=0.7):
    """Synthetic CSV rows: objective -> accuracy (items right in a fixed order)."""
    rows = [{"task": task, "role": "report", "objective": continuum.BASE, "seed": None, "alpha_mean": None,
             "items": "1" * int(base * n) + "0" * (n - int(base * n)), "base_mean_p": mean_p,
             "base_geometric_mean_p": mean_p / 2}]  # fmt: skip
    for key, acc in accuracies.items():
        k = int(acc * n)
        for s in range(seeds):
            rows.append({"task": task, "role": "report", "objective": key, "seed": s, "alpha_mean": 0.5,
                         "items": "1" * k + "0" * (n - k)})  # fmt: skip
    return rows


def test_summary_finds_the_best_static_objective_and_judges_the_controllers():
    acc = {"nll": 0.30, "negprob": 0.60, "alpha10": 0.59, "thresholded": 0.10, "dft": 0.40, "adaptive": 0.58,
           "linear": 0.20}  # fmt: skip
    (s,) = continuum.summarize(_rows("t", acc), resamples=500)
    assert s["best_static"] == "negprob" and s["seeds"] == [0, 1, 2] and s["base"] == 0.6
    assert set(s["tied_with_best"]) == {"negprob", "alpha10"}
    adaptive = s["objectives"]["adaptive"]
    assert continuum._verdict(adaptive["vs_best"]) == "tied"  # 0.58 vs 0.60: items differ on 2 in 100
    assert continuum._verdict(adaptive["vs_linear"]) == "better"
    assert continuum._verdict(s["objectives"]["thresholded"]["vs_nll"]) == "**worse**"
    diag = continuum.diagnosis(s)  # mean p 0.7 and base accuracy 0.6 both say −p, which won
    assert diag["mean p (paper)"] == {"value": 0.7, "pick": "negprob", "hit": True}
    assert diag["base accuracy"]["hit"]
    text = continuum.markdown(_rows("t", acc))
    assert "Hit rate: mean p (paper) 1/1; base accuracy 1/1" in text and "(best static)" in text


def test_plan_runs_bases_first_then_whole_seeds_and_the_last_tasks_at_the_end():
    import argparse

    args = argparse.Namespace(tasks=["reverse3", "uppercase", "add"], objectives=["nll", "negprob"], seeds=2)
    runs = continuum.plan(args)
    assert runs[:3] == [("reverse3", "base", None), ("uppercase", "base", None), ("add", "base", None)]
    assert runs[3:7] == [("reverse3", "nll", 0), ("reverse3", "negprob", 0), ("add", "nll", 0), ("add", "negprob", 0)]
    assert all(t == "uppercase" for t, _, _ in runs[-4:]) and len(runs) == 3 + 3 * 2 * 2


def test_successor_task_checks_natural_answers():
    from bnll_lightning.tasks import TASKS

    task = TASKS["successor"]
    row = task.generate(1, 0)[0]
    n = int(row["answer"])
    assert task.check(str(n), row) and task.check(f"The number that comes after {n - 1} is {n}.", row)
    assert not task.check(f"The number that comes after {n - 1} is {n - 1}.", row)
    import random

    assert all(task.corrupt(row["answer"], random.Random(i)) != row["answer"] for i in range(20))


@pytest.mark.slow
def test_task_table_is_measured_per_task(tmp_path):
    table = tmp_path / "tasks.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "continuum_tasks.py"), "--quick", "--tasks", "add", "capital",
         "--table", str(table)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    headers, rows = C.parse_markdown_table(table.read_text())
    assert [r[0] for r in rows] == ["add", "capital"]
    for r in rows:
        cells = dict(zip(headers, r))
        assert 0.0 <= float(cells["base mean p"]) <= 1.0 and 0.0 <= float(cells["base accuracy"]) <= 1.0
        assert cells["correct"].endswith("/4") and cells["zone by accuracy"].startswith("model-")
