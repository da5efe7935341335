"""benchmarks/noise_study.py: held-out items, disjoint training and probe rows, the noise rate asked, curves, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import noise_study as NS  # noqa: E402
from bnll_lightning.data import SFTDataModule  # noqa: E402


def _args(tmp_path, **overrides):
    args = NS.build_parser().parse_args(["--out", str(tmp_path), "--canonical_targets", "--num_eval", "50"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("name", sorted(NS.NOISE_TASKS))
def test_no_evaluation_item_is_in_the_pool_or_any_seeds_rows(tmp_path, name):
    task = NS.NOISE_TASKS[name]
    args = _args(tmp_path)
    evaluation = {r["prompt"] for r in NS.eval_rows(task, args)}
    assert len(evaluation) == NS._num_eval(task, args)
    rows, counts = NS.pool(task, args, str(tmp_path))
    assert counts["kept"] == len(rows) and not evaluation & {r["prompt"] for r in rows}
    seen_train = set()
    for seed in range(3):
        train_path, probe_path = NS.seed_rows(task, seed, args, str(tmp_path))
        train = [json.loads(line)["prompt"] for line in open(train_path)]
        held = [json.loads(line)["prompt"] for line in open(probe_path)]
        assert len(train) == NS._num_train(task, args) and len(held) == args.probe_rows
        assert not set(train) & set(held) and not (set(train) | set(held)) & evaluation
        seen_train |= set(train)
    assert len(seen_train) > NS._num_train(task, args)  # seeds draw different rows


def test_capital_holds_out_90_countries_and_keeps_the_rest_for_the_pool(tmp_path):
    task = NS.NOISE_TASKS["capital_self"]
    args = _args(tmp_path, num_eval=200)
    evaluation = {r["prompt"] for r in NS.eval_rows(task, args)}
    candidates = NS.candidate_rows(task, task.pool, evaluation)
    assert len(evaluation) == 90 and len(candidates) == 99  # 189 countries, every one used once


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_the_noise_rate_is_the_one_asked(tmp_path, tokenizer, rate):
    task = NS.NOISE_TASKS["successor_self"]
    args = _args(tmp_path)
    train_path, _ = NS.seed_rows(task, 1, args, str(tmp_path))
    data = NS.datamodule(train_path, 1, rate, tokenizer, args)
    data.setup("fit")
    assert data.stats["train"].get("noisy", 0) == round(rate * args.num_train)


def test_the_plan_puts_the_core_grid_first_and_every_run_once():
    args = NS.build_parser().parse_args([])
    runs = NS.plan(args)
    assert len(runs) == len(set(runs))
    strong = [t for t in NS.NOISE_TASKS if NS.NOISE_TASKS[t].self_phrased]
    assert runs[: len(NS.NOISE_TASKS)] == [(t, NS.BASE, None, None) for t in NS.NOISE_TASKS]
    first = runs[len(NS.NOISE_TASKS): len(NS.NOISE_TASKS) + len(strong) * len(NS.CORE)]
    assert {(t, k, n) for t, k, s, n in first} == {(t, k, 0.2) for t in strong for k in NS.CORE}
    every = {(t, k, s, n) for t, k, s, n in runs}
    for t in strong:  # the whole list at 20 %, the core objectives at every rate, 3 seeds
        assert all((t, k, s, 0.2) in every for k in (*NS.CORE, *NS.REST) for s in range(3))
        assert all((t, k, s, n) in every for k in NS.CORE for s in range(3) for n in (0.0, 0.2, 0.4))
    assert all(("reverse3_long", k, s, 0.0) in every for k in NS.WEAK for s in range(3))
    core_end = len(NS.NOISE_TASKS) + 3 * len(strong) * len(NS.CORE)  # every seed of the core block, then weak + long
    assert {t for t, k, s, n in runs[core_end: core_end + 3 * len(NS.WEAK)]} == {"reverse3_long"}
    chosen = [i for i, (t, k, s, n) in enumerate(runs) if k not in NS.NOT_CHOSEN]
    late = [i for i, (t, k, s, n) in enumerate(runs) if k in NS.NOT_CHOSEN and n != 0.2 and t in strong]
    assert max(chosen) < min(late)  # the candidates the dev task did not choose come last on the grid



def test_the_validated_plan_puts_early_stopped_nll_against_the_objectives_at_the_noisiest_rate_first():
    args = NS.build_parser().parse_args(["--validate", "--objectives", *NS.VALIDATE_FIRST, *NS.VALIDATE_THEN])
    runs = NS.plan(args)
    assert len(runs) == len(set(runs))
    strong = [t for t in args.tasks if NS.NOISE_TASKS[t].self_phrased]
    first = [r for r in runs if r[1] != NS.BASE][: 3 * len(strong) * len(NS.VALIDATE_FIRST)]
    assert {(t, k, s, n) for t, k, s, n in first} == {
        (t, k, s, 0.4) for t in strong for k in NS.VALIDATE_FIRST for s in range(3)}
    assert NS.NOISE_TASKS[first[0][0]].role == "dev" and [r[2] for r in first] == sorted(r[2] for r in first)
    i = runs.index(first[-1]) + 1  # then the same block again, as reruns of what lacks the second monitor
    assert runs[i: i + len(first)] == [(*r, NS.RERUN) for r in first]
    later = runs[i + len(first):]
    assert all(len(r) == 4 for r in later) and {r[3] for r in later} == {0.0, 0.2, 0.4}
    assert not any(r[1] in NS.SUPERSEDED for r in later)  # the replaced design: in the first block only


def test_the_controllers_second_design_runs_on_the_dev_task_first_then_the_chosen_one_on_the_report_tasks():
    args = NS.build_parser().parse_args(["--validate", "--objectives", *NS.VALIDATE_FIRST, *NS.VALIDATE_SECOND])
    runs = [r for r in NS.plan(args) if r[1] != NS.BASE]
    strong = [t for t in args.tasks if NS.NOISE_TASKS[t].self_phrased]
    first = 3 * len(strong) * len(NS.VALIDATE_FIRST)
    dev = runs[first: first + 3 * len(NS.VALIDATE_SECOND)]
    assert {(t, k, s, n) for t, k, s, n in dev} == {
        ("successor_self", k, s, 0.4) for k in NS.VALIDATE_SECOND for s in range(3)}
    report = runs[first + len(dev): first + len(dev) + 3 * (len(strong) - 1) * len(NS.CHOSEN)]
    assert {(k, n) for t, k, s, n in report} == {(k, 0.4) for k in NS.CHOSEN}
    assert {t for t, *_ in report} == set(strong) - {"successor_self"}


def test_a_rerun_is_claimed_only_for_a_finished_run_without_the_second_monitor(tmp_path):
    csv_path = str(tmp_path / "noise_study.csv")
    old, new, running = ("t", "nll", 0, 0.4), ("t", "nll", 1, 0.4), ("t", "nll", 2, 0.4)
    runs = [old, new, running] + [(*r, NS.RERUN) for r in (old, new, running)]
    row = {"config": "c", "task": "t", "objective": "nll", "noise": 0.4, "items": "10"}
    NS.append_row(csv_path, {**row, "seed": 0})  # finished before the second monitor
    NS.append_row(csv_path, {**row, "seed": 1, "best_p_items": "11"})
    assert NS.claim_next("c", csv_path, runs) == running  # claimed by this process: running
    assert NS.claim_next("c", csv_path, runs) == (*old, NS.RERUN)  # neither new's nor running's
    assert NS.claim_next("c", csv_path, runs) is None
    NS.append_row(csv_path, {**row, "seed": 0, "items": "01", "best_p_items": "01"})  # the rerun's row
    rows = NS.read_csv(csv_path, "c")
    assert len(rows) == 2 and {r["seed"]: r["items"] for r in rows}[0] == "01"  # the latest row of a run

def _study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_study.py"), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_quick_study_writes_curves_noise_and_resumes(tmp_path):
    proc = _study(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = NS.read_csv(str(tmp_path / "noise_study.csv"))
    quick = NS.QUICK
    runs = [r for r in rows if r["objective"] != NS.BASE]
    assert {r["task"] for r in rows} == set(quick["tasks"]) and len(runs) == len({(r["task"], r["objective"], r["seed"], r["noise"]) for r in runs})
    for r in runs:
        curve = json.loads(r["curve"])
        assert [p["epoch"] for p in curve] == quick["eval_epochs"]  # a point after each asked epoch
        assert curve[-1]["items"] == r["items"] and len(r["items"]) == quick["num_eval"]  # the last point is the result
        assert r["noisy_rows"] == round(r["noise"] * quick["num_train"])
        assert r["steps"] == quick["epochs"] * quick["num_train"] // quick["batch_size"]
        assert len(json.loads(r["trace"])) == r["steps"]  # one trace entry per optimizer step
    assert (tmp_path / "curves.png").stat().st_size > 0 and "Noise study" in (tmp_path / "noise_study.md").read_text()
    again = _study(tmp_path)  # a rerun skips every finished run
    assert again.returncode == 0 and "0 of the 20 runs left (20 in the CSV)" in again.stderr
    assert len(NS.read_csv(str(tmp_path / "noise_study.csv"))) == len(rows)


def test_a_datamodule_keeps_the_answer_span_of_self_phrased_rows(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "Which number comes right after 4?", "response": "It is 5.", "answer": "5",
                                "task": "successor", "answer_span": [6, 7]}) + "\n")  # fmt: skip
    data = SFTDataModule(train=str(path), tokenizer=tokenizer, val_fraction=0.0, noise=1.0, seed=0)
    data.setup("fit")
    (row,) = data.raw_rows("train")
    assert row["noisy"] and row["response"].startswith("It is ") and row["response"].endswith(".")
    assert row["response"] != "It is 5."


def test_processes_share_one_queue_and_a_dead_claim_is_taken_again(tmp_path):
    csv_path = str(tmp_path / "noise_study.csv")
    runs = [("t", "nll", s, 0.2) for s in range(3)]
    assert NS.claim_next("c", csv_path, runs) == runs[0]  # claimed by this (live) process
    assert NS.claim_next("c", csv_path, runs) == runs[1]
    assert NS.claim_next("other config", csv_path, runs) == runs[0]  # claims are per configuration
    NS.append_row(csv_path, {"config": "c", "task": "t", "objective": "nll", "seed": 2, "noise": 0.2})
    assert NS.claim_next("c", csv_path, runs) is None  # 0, 1 claimed, 2 in the CSV
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(csv_path + ".claims", "w") as f:  # a process that died while running seed 0
        f.write(json.dumps({"config": "c", "run": list(runs[0]), "pid": int(dead.stdout)}) + "\n")
    assert NS.claim_next("c", csv_path, runs) == runs[0]


def test_a_mid_training_evaluation_gives_the_model_back_in_training_mode(tmp_path, tiny_model_dir):
    from benchmarks import continuum as CT
    from bnll_lightning.models import load_model, load_tokenizer

    args = _args(tmp_path, num_eval=4, max_new_tokens=2, eval_batch_size=4, probe_rows=2, num_train=4)
    args.model_path = tiny_model_dir
    CT.StudyModule.base[tiny_model_dir] = (load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval())
    module = CT.StudyModule(model=tiny_model_dir, histogram_every_n_steps=0)
    task = NS.NOISE_TASKS["successor_self"]
    _, probe_path = NS.seed_rows(task, 0, args, str(tmp_path))
    probe_data = NS.datamodule(probe_path, 0, 0.0, module.tokenizer, args)
    probe_data.setup("fit")
    module.model.train()
    point = NS.evaluate(module, task, probe_data, args)
    assert module.model.training and len(point["items"]) == 4 and point["probe_nll"] > 0



def test_a_validated_run_scores_its_best_checkpoint_by_each_monitor(tmp_path, tiny_model_dir):
    from benchmarks import continuum as CT
    from bnll_lightning.models import load_model, load_tokenizer

    args = _args(tmp_path, validate=True, num_eval=4, max_new_tokens=2, eval_batch_size=4, probe_rows=4, num_train=4,
                 batch_size=2, epochs=4, eval_epochs=[4], probe_batches=1, lr=3.0)  # fmt: skip
    args.model_path = tiny_model_dir
    CT.StudyModule.base[tiny_model_dir] = (load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval())
    row = NS.run_one(NS.NOISE_TASKS["successor_self"], "negprob", 0, 0.5, args, str(tmp_path))
    val = json.loads(row["val_curve"])
    assert [v["epoch"] for v in val] == [1, 2, 3, 4] and [v["step"] for v in val] == [2, 4, 6, 8]
    by_nll = min(val, key=lambda v: v["val_nll"])  # the first of equals, as ModelCheckpoint keeps it
    by_p = max(val, key=lambda v: v["val_mean_p"])
    assert (row["best_step"], row["best_epoch"]) == (by_nll["step"], by_nll["epoch"])
    assert (row["best_p_step"], row["best_p_epoch"]) == (by_p["step"], by_p["epoch"])
    assert {row["best_step"], row["best_p_step"]} - {8}  # lr 3 spoils the model: a best the curve never scored
    for prefix in ("best", "best_p"):  # scored on the evaluation items, whether or not the curve had that step
        items = row[f"{prefix}_items"]
        assert len(items) == 4 and row[f"{prefix}_correct"] == items.count("1")
        assert row[f"{prefix}_accuracy"] == items.count("1") / 4
        if row[f"{prefix}_step"] == 8:
            assert items == row["items"]  # the last step: the curve's own score

def test_the_curves_give_an_objective_one_colour_in_every_panel_and_name_a_panel_not_run():
    from benchmarks import noise_report as NR

    def row(task, key, noise, acc):
        items = "1" * acc + "0" * (4 - acc)
        curve = [{"epoch": e, "accuracy": acc / 4, "items": items} for e in (1, 2)]
        return {"task": task, "objective": key, "seed": 0, "noise": noise, "items": items, "curve": json.dumps(curve)}

    rows = [row("successor_self", "negprob", 0.0, 3), row("successor_self", "nll", 0.2, 1),
            row("successor_self", "negprob", 0.2, 2), row("reverse3_long", "nll", 0.0, 1)]  # fmt: skip
    fig = NR.plot_curves(rows, resamples=10)
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {NS.ENTRIES["nll"].label, NS.ENTRIES["negprob"].label}
    assert all(len(c) == 1 for c in colours.values())  # −p is alone in one panel and second in another
    assert len({c for cs in colours.values() for c in cs}) == 2
    empty = [ax for ax in fig.axes if not ax.axison]
    assert [t.get_text() for ax in empty for t in ax.texts] == ["reverse3_long: not run at noise 20%"]


def test_the_overview_bolds_the_best_static_objective_and_counts_short_seeds():
    from benchmarks import noise_report as NR

    def row(key, seed, acc):
        items = "1" * acc + "0" * (4 - acc)
        curve = [{"epoch": 1, "accuracy": acc / 4, "items": items}]
        return {"task": "successor_self", "role": "dev", "objective": key, "seed": seed, "noise": 0.2, "items": items,
                "curve": json.dumps(curve), "alpha_mean": None}  # fmt: skip

    rows = [row("nll", 0, 1), row("nll", 1, 2), row("negprob", 0, 3), row("negprob", 1, 3), row("dft", 0, 4)]
    table = NR.overview_table(NR.summarize(rows, resamples=10), ["nll", "negprob", "dft", "linear"])
    header, _, line = table.splitlines()
    assert header.split(" | ")[1:] == [NS.ENTRIES[k].label for k in ("nll", "negprob")] + [NS.ENTRIES["dft"].label + " |"]
    # DFT is ahead but has 1 of 2 seeds: shown with its count, not crowned; the ramp was not run: no column
    assert line == "| `successor_self` (dev), 20% noise, 2 seeds | 0.375 | **0.750** | 1.000 (1 seed) |"


@pytest.mark.parametrize("name", sorted(NS.NOISE_TASKS))
def test_the_validation_split_is_held_out_and_noisy_at_the_training_rate(tmp_path, tokenizer, name):
    task = NS.NOISE_TASKS[name]
    args = _args(tmp_path, validate=True)
    evaluation = {r["prompt"] for r in NS.eval_rows(task, args)}
    for seed in range(3):
        train_path, probe_path = NS.seed_rows(task, seed, args, str(tmp_path))
        split = NS.validation_split(probe_path, seed, 0.5, tokenizer, args)
        prompts = [r["prompt"] for r in split.raw_rows("train")]
        train = {json.loads(line)["prompt"] for line in open(train_path)}
        assert len(prompts) == args.probe_rows and not set(prompts) & (evaluation | train)
        assert split.stats["train"]["noisy"] == round(0.5 * args.probe_rows)  # the user's data: as noisy as training
        assert len(NS.validation_loader(split, args).dataset) == args.probe_rows


def test_best_by_validation_picks_the_step_the_metric_says(tmp_path):
    import lightning.pytorch as L
    import torch

    scripted = [3.0, 2.0, 1.5, 1.7, 1.6, 2.5]  # val/nll after epochs 1..6: the best is epoch 3, step 3 * 2

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/nll", scripted[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    best = NS.best_checkpoint(str(tmp_path), "val/nll")
    trainer = L.Trainer(max_epochs=len(scripted), logger=False, callbacks=[best], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip
    module = Module()
    trainer.fit(module, data, data)
    step, path = NS.best_by_validation(best)
    assert step == 6 and float(best.best_model_score) == 1.5
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # top-1: one file, the best
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6 and "optimizer_states" not in saved  # weights only


def test_each_groups_weak_end_comes_before_its_strong_tasks_and_the_first_group_before_the_rest_of_the_list():
    objectives = [*NS.VALIDATE_FIRST, *NS.VALIDATE_SECOND, *NS.VALIDATE_THEN]  # --validate's default list
    runs = [r for r in NS.plan(NS.build_parser().parse_args(["--validate", "--objectives", *objectives]))
            if r[1] != NS.BASE and len(r) == 4]
    weak = [i for i, r in enumerate(runs) if not NS.NOISE_TASKS[r[0]].self_phrased]
    then = [i for i, r in enumerate(runs) if r[1] in NS.VALIDATE_THEN]
    assert weak and then and NS.CHOSEN[0] in {runs[i][1] for i in weak}
    first_weak = {runs[i][1] for i in weak if i < then[0]}
    assert first_weak == {k for k in (*NS.VALIDATE_FIRST, *NS.CHOSEN) if k in NS.WEAK or k in NS.CHOSEN}
    then_weak = [i for i in weak if i >= then[0]]
    assert {runs[i][1] for i in then_weak} == {k for k in NS.VALIDATE_THEN if k in (*NS.WEAK, "asft")}
    for group in ([k for k in NS.VALIDATE_THEN if k not in NS.THEN_LAST], NS.THEN_LAST):  # each group's weak end first
        mine = [i for i in then if runs[i][1] in group]
        mine_weak = [i for i in mine if i in then_weak]
        assert mine_weak == mine[: len(mine_weak)]
    last = [i for i in then if runs[i][1] in NS.THEN_LAST]
    assert last and max(i for i in then if runs[i][1] not in NS.THEN_LAST) < min(last)  # the ramp after the rest
