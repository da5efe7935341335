"""benchmarks/continuum.py: the accuracy-after-fine-tuning benchmark across the continuum."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common as C  # noqa: E402
from benchmarks import continuum  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run as a user runs it (a subprocess: the script sets torch's thread count)."""
    out = tmp_path_factory.mktemp("continuum")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "continuum.py"), "--quick", "--out", str(out), "--append",
         "--docs", str(out / "benchmarks.md")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_one_row_per_task_and_objective_plus_base(quick):
    out, _ = quick
    rows = continuum.read_csv(str(out / "continuum.csv"))
    expected = {(t, o) for t in continuum.DEFAULT_TASKS for o in (continuum.BASE, *continuum.OBJECTIVE_KEYS)}
    assert [(r["task"], r["objective"]) for r in rows] == sorted(expected, key=lambda k: (
        continuum.DEFAULT_TASKS.index(k[0]), (continuum.BASE, *continuum.OBJECTIVE_KEYS).index(k[1])))
    for r in rows:
        assert math.isfinite(r["accuracy"]) and 0.0 <= r["accuracy"] <= 1.0
        assert r["n"] == 4 and r["accuracy"] == pytest.approx(r["correct"] / r["n"])
        assert 0.0 <= r["base_mean_p"] <= 1.0 and r["base_accuracy"] == next(
            b["accuracy"] for b in rows if b["task"] == r["task"] and b["objective"] == continuum.BASE)
        # Same budget and data for every objective: the --quick budget was trained in full.
        assert (r["steps"], r["batch_size"], r["num_train"], r["seed"]) == (
            (0 if r["objective"] == continuum.BASE else 2), 2, 4, 0)
        if r["objective"] != continuum.BASE:
            assert r["noise"] == (0.3 if r["task"] == "capital" else 0.0)
    alphas = {r["objective"]: r["alpha"] for r in rows if r["task"] == "add"}
    assert (alphas["nll"], alphas["negprob"], alphas["alpha10"], alphas["thresholded"]) == (0.0, 1.0, 10.0, None)
    assert 0.0 <= alphas["adaptive"] <= 1.0  # the controller's mean α, read from the run


def test_quick_run_writes_the_table_the_plot_and_the_runs(quick):
    out, proc = quick
    headers, table = C.parse_markdown_table((out / "continuum.md").read_text())
    assert "accuracy" in headers and len(table) == len(continuum.DEFAULT_TASKS) * (1 + len(continuum.OBJECTIVE_KEYS))
    assert "| figlet |" in proc.stdout  # the table is printed too
    docs = (out / "benchmarks.md").read_text()  # --append: the section with the exact command and the machine
    assert f"- command: `python benchmarks/continuum.py --quick --out {out} --append --docs" in docs
    assert "- machine: " in docs and docs.count("| capital |") == 6
    png = (out / "continuum.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (out / "predictions" / "capital" / "adaptive.jsonl").read_text().count("\n") == 4
    assert list((out / "runs" / "capital" / "adaptive").glob("events.out.tfevents.*"))


def test_noise_spec_and_zones():
    assert continuum.parse_noise(["capital=0.3"], ["add", "capital"]) == {"add": 0.0, "capital": 0.3}
    assert continuum.parse_noise(["0.2", "add=0"], ["add", "capital"]) == {"add": 0.0, "capital": 0.2}
    assert continuum.parse_noise([], ["add"]) == {"add": 0.0}
    assert continuum.parse_noise(["capital=0.3"], ["add"]) == {"add": 0.0}  # the default, capital not run
    with pytest.raises(ValueError):
        continuum.parse_noise(["capital=1.5"], ["capital"])
    with pytest.raises(ValueError, match="captial"):
        continuum.parse_noise(["captial=0.3"], ["capital"])  # a typo is not silently noise-free
    assert continuum.zone_by_accuracy(0.30) == "model-strong"
    assert continuum.zone_by_accuracy(math.nextafter(0.30, 0)) == "model-intermediate"
    assert continuum.zone_by_accuracy(0.05) == "model-intermediate"
    assert continuum.zone_by_accuracy(0.04) == "model-weak"


def test_eval_rows_are_distinct_and_report_the_overlap_with_training(tokenizer):
    import argparse

    args = argparse.Namespace(num_train=128, num_eval=50, batch_size=8, seed=0, max_length=256)
    for task, most_unseen in (("capital", False), ("add", True)):
        data = continuum.datamodule(task, args, 0.3, tokenizer)
        data.setup("fit")
        rows, unseen = continuum.eval_rows(data, task, 50, seed=0)
        prompts = [r["prompt"] for r in rows]
        assert len(prompts) == len(set(prompts)) == 50 and all(r["task"] == task for r in rows)
        train = {r["prompt"] for r in data.raw_rows("train")}
        assert unseen == sum(p not in train for p in prompts)
        # capital has 50 countries and 128 training rows: nearly all seen; add's rows are held out
        assert (unseen >= 45) if most_unseen else (unseen <= 10)
        assert rows == continuum.eval_rows(data, task, 50, seed=0)[0]  # the same rows for every objective


def _row(task, objective, accuracy, alpha=None):
    return {
        "task": task, "objective": objective, "label": objective, "alpha": alpha, "alpha_final": alpha,
        "accuracy": accuracy, "correct": int(accuracy * 10), "n": 10, "eval_unseen": 10, "base_mean_p": 0.5,
        "zone_p": "model-strong", "zone_accuracy": "model-strong", "train_mean_p": 0.5, "noise": 0.0,
        "train_seconds": 1.0, "eval_seconds": 1.0,
    }  # fmt: skip


def test_markdown_marks_the_best_objective_and_csv_round_trips(tmp_path):
    rows = [_row("t", continuum.BASE, 0.4), _row("t", "nll", 0.2, 0.0), _row("t", "negprob", 0.6, 1.0),
            _row("t", "thresholded", 0.5)]  # fmt: skip
    _, table = C.parse_markdown_table(continuum.markdown(rows))
    accuracy = {line[3]: line[5] for line in table}
    assert accuracy == {"base": "0.400", "nll": "0.200", "negprob": "**0.600**", "thresholded": "0.500"}
    continuum.write_csv(rows, str(tmp_path / "c.csv"))
    back = continuum.read_csv(str(tmp_path / "c.csv"))
    assert [(r["objective"], r["accuracy"], r["alpha"]) for r in back] == [
        (r["objective"], r["accuracy"], r["alpha"]) for r in rows]


def test_plot_draws_every_objective(tmp_path):
    rows = [_row("a", continuum.BASE, 0.1), _row("a", "nll", 0.3, 0.0), _row("a", "negprob", 0.2, 1.0),
            _row("a", "alpha10", 0.1, 10.0), _row("a", "thresholded", 0.15), _row("a", "adaptive", 0.25, 0.4)]
    fig = continuum.plot(rows, str(tmp_path / "p.png"))
    ax = fig.axes[0]
    points = {tuple(map(float, xy)) for line in ax.lines for xy in line.get_xydata()}
    assert {(0.0, 0.3), (1.0, 0.2), (10.0, 0.1), (0.4, 0.25), (continuum._X_THRESHOLDED, 0.15)} <= points
    assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == 0.1 for line in ax.lines)  # the base model
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


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


def test_controller_statistic_entries_are_opt_in_and_drive_their_statistic():
    assert set(continuum.OBJECTIVE_KEYS) < set(continuum.ENTRIES)  # not run by default
    for key, statistic in (("adaptive", "mean"), ("adaptive_geometric", "geometric"), ("adaptive_quantile", "quantile")):
        objective, controller = continuum.ENTRIES[key].make()
        assert type(objective).__name__ == "AlphaFamily" and controller.statistic == statistic
    rows = [_row("t", continuum.BASE, 0.4), _row("t", "adaptive_geometric", 0.5, 0.3)]
    _, table = C.parse_markdown_table(continuum.markdown(rows))
    assert table[1][4] == "0.30 (mean), 0.30 (end)"  # α read from the run, like the default controller
