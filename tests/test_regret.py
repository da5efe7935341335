"""benchmarks/regret.py: cells joined across the studies, the best static objective, regret and its intervals."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import regret as R  # noqa: E402
from bnll_lightning.compare import bootstrap  # noqa: E402

FIELDS = ("config", "task", "role", "objective", "seed", "noise", "items", "best_items", "best_epoch", "best_p_items",
          "best_p_epoch")


def _items(n_right: int, n: int = 40) -> str:
    return "1" * n_right + "0" * (n - n_right)


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({"config": "c1", "role": "report", "best_items": "", "best_epoch": "", "best_p_items": "",
                        "best_p_epoch": "", **r})
    return path


def _run(task, objective, seed, right, noise=0.4, **extra):
    return {"task": task, "objective": objective, "seed": seed, "noise": noise, "items": _items(right), **extra}


@pytest.fixture
def sources(tmp_path):
    noise = [_run("t", o, s, right) for s in (0, 1, 2) for o, right in (("nll", 20), ("negprob", 30), ("adaptive", 28))]
    noise += [_run("t", "base", "", 10)]  # the base model: never an option
    noise += [_run("t", "alpha05", 0, 39)]  # one seed of three: not the best static, not judged yet
    es = [_run("t", "nll", s, 21, best_items=_items(25), best_epoch=1) for s in (0, 1, 2)]
    es += [_run("t", "plateau", s, 29 + s, best_items=_items(26), best_epoch=2) for s in (0, 1, 2)]
    es[2].update(best_p_items=_items(33), best_p_epoch=4)  # NLL's seed 2 only: runs before the second monitor lack it
    es += [_run("u", "nll", s, 10, noise=0.2, best_items=_items(12), best_epoch=1) for s in (0, 1)]
    es += [{**_run("t", "negprob", 0, 5), "config": "c0"}]  # a pilot of another configuration: ignored
    es += [_run("u", "nll", 1, 11, noise=0.2, best_items=_items(12), best_epoch=1)]  # a rerun: its latest row counts
    return {"continuum": tmp_path / "absent.csv", "noise": _write(tmp_path / "noise.csv", noise),
            "early_stop": _write(tmp_path / "es.csv", es)}  # fmt: skip


def test_read_keeps_the_most_run_configuration_and_drops_the_base_row(sources):
    rows = R.read(sources["early_stop"])
    assert len(rows) == 8 and {r["config"] for r in rows} == {"c1"}
    assert [r["items"].count("1") for r in rows if r["task"] == "u"] == [10, 11]
    assert all(r["objective"] != "base" for r in R.read(sources["noise"]))
    assert R.read(sources["continuum"]) == []


def test_early_stop_runs_join_the_noise_cell_and_replace_its_reruns(sources):
    cells, check = R.cells(sources)
    cell = cells[("noise", "t", 0.4)]
    assert cell["nll"][1].sum() == 21  # the rerun replaced the noise grid's 20
    assert cell["nll" + R.ES][2].sum() == 25 and cell["plateau"][2].sum() == 31
    assert cell["negprob"][0].sum() == 30  # not rerun: kept
    assert check == {"reproduced": 0, "compared": 3, "differing_items": 3}
    assert ("early_stop", "u", 0.2) in cells  # a cell only the early-stopping grid has stays its own
    assert R.best_static(cell) == "negprob"  # alpha05 has 1 seed of the cell's 3
    assert R.best_static({"adaptive": cell["adaptive"]}) is None


def test_draws_are_compare_bootstraps_draws():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, (3, 50)), rng.integers(0, 2, (3, 50))
    lo, hi = np.percentile(R.draws(a, b, 400, seed=7), [2.5, 97.5])
    assert (float((a - b).mean()), float(lo), float(hi)) == pytest.approx(bootstrap(a, b, resamples=400, seed=7))


def test_regret_is_the_paired_shortfall_to_the_best_static_objective(sources):
    cells, _ = R.cells(sources)
    rows = {r["option"]: r for r in R.regret(cells, resamples=300)}
    assert rows["negprob"]["worst"] == (0.0, 0.0, 0.0) and rows["negprob"]["behind"] == 0
    nll = rows["nll"]
    assert nll["worst"][0] == pytest.approx((21 - 30) / 40) and nll["behind"] == 1
    assert nll["worst_cell"] == ("noise", "t", 0.4)
    assert rows["nll" + R.ES]["worst"][0] == pytest.approx((25 - 30) / 40)
    assert rows["plateau"]["worst"][0] == pytest.approx((30 - 30) / 40)  # 29, 30, 31 against 30
    assert "nll" + R.ESP not in rows  # one seed of three by val/mean_p: waits
    assert R.label("nll" + R.ESP) == "NLL, best by val/mean_p" and R.split("plateau" + R.ES) == ("plateau", "val/nll")
    assert "alpha05" not in rows  # one seed of three waits
    assert nll["mean"][1] <= nll["mean"][0] <= nll["mean"][2]
    # Sorted by worst shortfall: the best static objective first, NLL last.
    assert list(rows)[0] in ("negprob", "plateau") and list(rows)[-1] == "nll"


def test_the_report_names_every_option_with_intervals(sources, tmp_path):
    out = tmp_path / "es.md"
    text = R.main(["--out", str(out), "--bootstrap", "200"], sources=sources)
    assert out.read_text(encoding="utf-8") == text
    table = text.split("Early stopping (validation")[1]
    assert "| `t` (report), 40% | NLL | 3 | 0.525 [" in table  # 21/40 at every seed
    assert "best by val/nll" in text and "PlateauAlpha" in text
    assert "0 of 3 reproduce" in text
    (nll,) = [line for line in table.splitlines() if line.startswith("| `t` (report), 40% | NLL |")]
    assert nll.split(" | ")[9].startswith("0.825 [") and nll.endswith("(1) | 4 | – |")  # 33/40 at its one seed, epoch 4


def test_the_target_table_sets_each_controller_against_early_stopped_nll_v3_and_the_best_static_with_es(sources):
    cells, _ = R.cells(sources)
    cell = cells[("noise", "t", 0.4)]
    # The best static option with early stopping: negprob's last (30) beats NLL's best by val/nll (25); NLL's best
    # by val/mean_p (33) has one seed of three and waits.
    assert R.best_static_selected(cell) == "negprob"
    cell["negprob" + R.ES] = {s: np.asarray([1.0] * 35 + [0.0] * 5) for s in (0, 1, 2)}
    assert R.best_static_selected(cell) == "negprob" + R.ES
    table = R.target_table({("noise", "t", 0.4): cell}, resamples=200)
    (line,) = [row for row in table.splitlines() if "PlateauAlpha" in row]
    fields = line.split(" | ")
    assert fields[2] == "3" and fields[3].startswith(f"{(30 - 25) / 40:+.3f} [")  # 29, 30, 31 against 25
    assert fields[-1] == "– |"  # the controller's best by val/mean_p: none in these runs
    cell["plateau" + R.ESP] = {s: np.asarray([1.0] * 36 + [0.0] * 4) for s in (0, 1, 2)}
    (line,) = [row for row in R.target_table({("noise", "t", 0.4): cell}, resamples=200).splitlines()
               if "PlateauAlpha" in row]
    assert line.split(" | ")[-1].startswith(f"{(36 - 35) / 40:+.3f} [")  # against negprob's best by val/nll
    assert fields[4].startswith(f"{(31 - 33) / 40:+.3f} [")  # over the one seed both have: seed 2
    assert fields[5] == "–"  # v3 was not run in this cell
    assert fields[6].startswith(f"{(30 - 35) / 40:+.3f} [") and "(−p, best by val/nll)" in fields[6]


def test_like_for_like_regret_keeps_the_cells_an_option_ran_in_and_the_options_run_in_all_of_them(sources):
    cells, _ = R.cells(sources)
    cells[("noise", "v", 0.4)] = {"nll": cells[("noise", "t", 0.4)]["nll"]}  # a cell without the controller
    everywhere = {r["option"]: r for r in R.regret(cells, resamples=200)}
    assert everywhere["nll"]["cells"] == 3  # t, u (the early-stopping grid alone) and v
    rows = {r["option"]: r for r in R.regret(cells, resamples=200, only="plateau")}
    assert {r["cells"] for r in rows.values()} == {1} and "plateau" in rows
    assert rows["nll"]["cell_list"] == [("noise", "t", 0.4)]
    assert "alpha05" not in rows  # one seed of three: not run in every one of the controller's cells


def test_like_for_like_leaves_out_the_cells_the_chosen_option_has_only_partly_run(sources):
    cells, _ = R.cells(sources)
    cells[("noise", "v", 0.2)] = {"nll": cells[("noise", "t", 0.4)]["nll"],  # 3 seeds
                                  "plateau": {0: cells[("noise", "t", 0.4)]["plateau"][0]}}  # 1 of them: waits
    rows = {r["option"]: r for r in R.regret(cells, resamples=200, only="plateau")}
    assert rows["plateau"]["cells"] == 1 and rows["plateau"]["cell_list"] == [("noise", "t", 0.4)]
    assert rows["nll"]["cells"] == 1


def test_head_to_head_pairs_the_two_options_on_the_cells_both_ran_with_every_seed(sources):
    cells, _ = R.cells(sources)
    t = cells[("noise", "t", 0.4)]
    cells[("noise", "w", 0.0)] = {"nll": t["nll"], "negprob": {0: t["negprob"][0]}}  # one seed of three: left out
    h = R.head_to_head(cells, "negprob", "nll", resamples=200)
    both = [k for k, c in cells.items() if "negprob" in c and "nll" in c and len(c["negprob"]) == len(c["nll"])]
    assert h["cells"] == len(both) and ("noise", "w", 0.0) not in both
    diffs = [float(np.mean([cells[k]["negprob"][s].mean() - cells[k]["nll"][s].mean() for s in cells[k]["nll"]]))
             for k in both]
    assert h["mean"][0] == pytest.approx(np.mean(diffs)) and h["lowest"][0] == pytest.approx(min(diffs))
    assert h["mean"][1] <= h["mean"][0] <= h["mean"][2]
    assert h["ahead"] + h["behind"] <= h["cells"]
    line = R.head_to_head_line(h, "negprob", "nll")
    assert line.startswith(f"−p − NLL, paired, over the {len(both)} cells both ran: mean {h['mean'][0]:+.3f} [")
    assert R.head_to_head(cells, "negprob", "no such option", resamples=200) is None


def test_the_report_has_the_regret_on_the_validated_cells_with_each_option_at_its_best(sources, monkeypatch):
    es = R.read(sources["early_stop"])
    for r in es:  # every early-stopping run of task t also kept its best checkpoint by val/mean_p
        if r["task"] == "t":
            r["best_p_items"], r["best_p_epoch"] = _items(27 if r["objective"] == "plateau" else 24), 3
    _write(sources["early_stop"], es)
    monkeypatch.setattr(R, "CHOSEN", "plateau")
    text = R.main(["--out", str(sources["noise"].parent / "es.md"), "--bootstrap", "200"], sources=sources)
    section = text.split("With validation: the same on the cells where")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    options = {line.split(" | ")[0][2:] for line in rows}
    assert {R.label("plateau+ESp"), R.label("nll+ESp"), R.label("plateau"), R.label("nll")} <= options
    assert all(line.split(" | ")[1] == "1" for line in rows)  # only t at 40 %: the one cell with the selection
