"""Early stopping against the objectives, and each option's regret across the studies, from their CSVs.

Two tables (issue 27):

* **Early stopping** (``noise_study.py --validate``): per task and noise rate, each objective's held-out
  accuracy at its last checkpoint and at its best checkpoint by the validation metric (``ModelCheckpoint``
  on ``val/nll`` of a held-out split as noisy as training), and both against early-stopped NLL, paired.
* **Regret**: for every option (an objective or controller at its last checkpoint, or with early
  stopping), over every cell it ran in (the continuum tasks, the noise grid, the early-stopping grid), its
  paired difference to the cell's best static objective (last checkpoint): the worst cell, the mean over
  cells (the cells' bootstrap draws averaged: cells are independent), and the cells it is behind with an
  interval below 0. What a user loses by picking the option without knowing where their task sits.

    python benchmarks/regret.py      # writes docs/early_stop/early_stop.md from the committed CSVs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bnll_lightning.compare import bootstrap, format_ci
from bnll_lightning.study import RunsCSV, items_array

ES = "+ES"  # an option's suffix: its best checkpoint by validation (val/nll) instead of its last
ESP = "+ESp"  # the same by val/mean_p (noise_study.py's second monitor; runs finished before it have none)
SELECTIONS = ((ES, "best", "val/nll"), (ESP, "best_p", "val/mean_p"))  # suffix, CSV prefix, monitor
ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # study -> its CSV (the configuration its report uses: the one with the most runs)
    "continuum": ROOT / "docs" / "continuum" / "continuum.csv",
    "noise": ROOT / "docs" / "noise_study" / "noise_study.csv",
    "early_stop": ROOT / "docs" / "early_stop" / "noise_study.csv",
}
Cell = dict[str, dict[int, np.ndarray]]  # option -> seed -> per-item 0/1


def _entries() -> Mapping[str, Any]:
    from benchmarks.noise_study import ENTRIES

    return ENTRIES


def split(option: str) -> tuple[str, str | None]:
    """(objective key, monitor of its best checkpoint or None: the last checkpoint)."""
    for suffix, _, monitor in SELECTIONS:
        if option.endswith(suffix):
            return option[: -len(suffix)], monitor
    return option, None


def label(option: str) -> str:
    key, monitor = split(option)
    entry = _entries().get(key)
    name = entry.label if entry is not None else key
    return f"{name}, best by {monitor}" if monitor else name


def is_static(option: str) -> bool:
    entry = _entries().get(option)
    return bool(entry is not None and entry.static)


def read(path: Path) -> list[dict[str, Any]]:
    """The rows of the CSV's most-run configuration (a CSV may hold pilots of other ones), a run's latest row."""
    if not path.exists():
        return []
    rows = RunsCSV(path, ()).read()
    if not rows:
        return []
    configs: dict[str, int] = {}
    for r in rows:
        configs[r["config"]] = configs.get(r["config"], 0) + 1
    config = max(configs, key=configs.get)
    # A run rerun (noise_study.py's second monitor) counts once: its latest row.
    latest = {(r["task"], r["objective"], r["seed"], r["noise"]): r for r in rows if r["config"] == config}
    return [r for r in latest.values() if r["objective"] != "base"]


def _items(items: str) -> np.ndarray:
    return items_array(items).astype(np.float64)


def _noise(r: Mapping[str, Any]) -> float:
    return round(float(r.get("noise") or 0.0), 3)


def cells(sources: Mapping[str, Path] = SOURCES) -> tuple[dict[tuple[str, str, float], Cell], dict[str, Any]]:
    """(study, task, noise) -> option -> seed -> items. The early-stopping grid's runs join the noise grid's cell
    of the same task and rate (same rows, order, noise and evaluation items) as the options that cell lacks:
    each objective with early stopping, and the controllers only it ran; a cell only it has stays its own.
    Also says how many of its last checkpoints reproduce the noise grid's item by item."""
    out: dict[tuple[str, str, float], Cell] = {}
    for study in ("continuum", "noise"):
        for r in read(sources[study]):
            out.setdefault((study, r["task"], _noise(r)), {}).setdefault(r["objective"], {})[int(r["seed"])] = (
                _items(r["items"]))
    same = compared = differing = 0
    for r in read(sources["early_stop"]):
        seed, last = int(r["seed"]), _items(r["items"])
        cell = out.get(("noise", r["task"], _noise(r)))
        if cell is None:
            cell = out.setdefault(("early_stop", r["task"], _noise(r)), {})
        earlier = cell.get(r["objective"], {}).get(seed)
        if earlier is not None:
            compared += 1
            same += bool(np.array_equal(earlier, last))
            differing += int((earlier != last).sum())
        # The rerun replaces the earlier run: its best checkpoint and its last come from the same training.
        cell.setdefault(r["objective"], {})[seed] = last
        for suffix, prefix, _ in SELECTIONS:
            if r.get(f"{prefix}_items"):
                cell.setdefault(r["objective"] + suffix, {})[seed] = _items(r[f"{prefix}_items"])
    return out, {"reproduced": same, "compared": compared, "differing_items": differing}


def draws(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap means of a − b, [seeds, items] paired: seeds and items drawn independently, as
    ``bnll_lightning.compare.bootstrap`` (whose interval is these draws' 2.5/97.5 percentiles)."""
    # Own code beside compare.bootstrap: the mean over cells needs the draws themselves, not just an interval.
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    s, n = x.shape
    si, ii = rng.integers(0, s, size=(resamples, s)), rng.integers(0, n, size=(resamples, n))
    return x[si[:, :, None], ii[:, None, :]].mean(axis=(1, 2))


def _ci(mean: float, d: np.ndarray) -> tuple[float, float, float]:
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(mean), float(lo), float(hi)


def paired(cell: Cell, a: str, b: str, resamples: int) -> tuple[tuple[float, float, float], np.ndarray] | None:
    common = sorted(set(cell.get(a, ())) & set(cell.get(b, ())))
    if not common:
        return None
    x, y = np.stack([cell[a][s] for s in common]), np.stack([cell[b][s] for s in common])
    d = draws(x, y, resamples)
    return _ci(float((x - y).mean()), d), d


def best_static(cell: Cell) -> str | None:
    """The cell's best static objective at its last checkpoint, among those with the cell's most seeds."""
    static = {k: v for k, v in cell.items() if is_static(k)}
    if not static:
        return None
    most = max(len(v) for v in static.values())
    scores = {k: float(np.mean([x.mean() for x in v.values()])) for k, v in static.items() if len(v) == most}
    return max(scores, key=scores.get)


def _mean_over_cells(rows: Sequence[tuple[Any, tuple[float, float, float], np.ndarray]]) -> tuple[float, float, float]:
    """The mean of (cell, interval, draws) rows' differences, its interval from their draws averaged (cells are
    independent)."""
    return _ci(float(np.mean([r[1][0] for r in rows])), np.mean(np.stack([r[2] for r in rows]), axis=0))


def _complete(cell: Cell, option: str, best: str | None) -> bool:
    """Whether ``option`` has every seed of the cell's best static objective ``best`` (a partly run option waits)."""
    return best is not None and option in cell and len(cell[option]) == len(cell[best])


def regret(all_cells: Mapping[tuple[str, str, float], Cell], resamples: int = 2000,
           only: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Per option: cells run, worst and mean Δ vs the cell's best static objective (paired), cells behind. With
    ``only``: on the cells that option ran in, and only the options run in every one of them (like for like)."""
    per: dict[str, list[tuple[tuple[str, str, float], tuple[float, float, float], np.ndarray]]] = {}
    keys = [k for k, cell in sorted(all_cells.items()) if only is None or _complete(cell, only, best_static(cell))]
    for key, cell in [(k, all_cells[k]) for k in keys]:
        best = best_static(cell)
        if best is None:
            continue
        for option in cell:
            if option == best:
                d = np.zeros(resamples)
                per.setdefault(option, []).append((key, (0.0, 0.0, 0.0), d))
                continue
            result = paired(cell, option, best, resamples)
            if result is not None and _complete(cell, option, best):
                per.setdefault(option, []).append((key, *result))
    out = []
    for option, rows in per.items():
        if only is not None and len(rows) < len(keys):
            continue
        worst = min(rows, key=lambda r: r[1][0])
        out.append({"option": option, "cells": len(rows), "worst": worst[1], "worst_cell": worst[0],
                    "mean": _mean_over_cells(rows), "behind": sum(r[1][2] < 0 for r in rows),
                    "cell_list": [r[0] for r in rows]})  # fmt: skip
    return sorted(out, key=lambda r: (-r["worst"][0], -r["mean"][0]))


def head_to_head(all_cells: Mapping[tuple[str, str, float], Cell], a: str, b: str,
                 resamples: int = 2000) -> dict[str, Any] | None:  # fmt: skip
    """``a`` − ``b``, paired, on every cell both ran with the same seeds: the mean over cells (the cells' draws
    averaged), the lowest cell, and the cells with an interval above and below 0."""
    rows = []
    for key, cell in sorted(all_cells.items()):
        if b in cell and _complete(cell, a, b) and (result := paired(cell, a, b, resamples)) is not None:
            rows.append((key, *result))
    if not rows:
        return None
    lowest = min(rows, key=lambda r: r[1][0])
    return {"cells": len(rows), "mean": _mean_over_cells(rows), "lowest": lowest[1], "lowest_cell": lowest[0],
            "ahead": sum(r[1][1] > 0 for r in rows), "behind": sum(r[1][2] < 0 for r in rows)}  # fmt: skip


def head_to_head_line(h: dict[str, Any] | None, a: str, b: str) -> str:
    if h is None:
        return f"{label(a)} − {label(b)}: no cell has both."
    (study, task, noise) = h["lowest_cell"]
    return (f"{label(a)} − {label(b)}, paired, over the {h['cells']} cells both ran: mean "
            f"{format_ci(h['mean'], signed=True)}; lowest {format_ci(h['lowest'], signed=True)} ({study}: `{task}` "
            f"{noise:.0%}); ahead with an interval above 0 in {h['ahead']}, behind with one below 0 in {h['behind']}.")


def regret_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| option | cells | worst shortfall [95 % CI] | in cell | mean Δ over cells [95 % CI] | cells behind (CI < 0) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        study, task, noise = r["worst_cell"]
        lines.append(f"| {label(r['option'])} | {r['cells']} | {format_ci(r['worst'], signed=True)} | {study}: "
                     f"`{task}` {noise:.0%} | {format_ci(r['mean'], signed=True)} | {r['behind']} |")  # fmt: skip
    return "\n".join(lines)


def early_stop_table(es_rows: Sequence[dict[str, Any]], resamples: int = 2000) -> str:
    """Per (task, noise) of the early-stopping grid: last and best-by-validation accuracy, and both against
    early-stopped NLL (paired over the seeds both have)."""
    by: dict[tuple[str, float], Cell] = {}
    epochs: dict[tuple[str, float, str], list[int]] = {}
    roles: dict[str, str] = {}
    for r in es_rows:
        cell = by.setdefault((r["task"], _noise(r)), {})
        cell.setdefault(r["objective"], {})[int(r["seed"])] = _items(r["items"])
        for suffix, prefix, _ in SELECTIONS:
            if r.get(f"{prefix}_items"):
                cell.setdefault(r["objective"] + suffix, {})[int(r["seed"])] = _items(r[f"{prefix}_items"])
                epochs.setdefault((r["task"], _noise(r), r["objective"] + suffix), []).append(int(r[f"{prefix}_epoch"]))
        roles[r["task"]] = r["role"]
    lines = ["| task (role), noise | objective | seeds | last checkpoint | best by val/nll | best epochs |"
             " best − last | last − early-stopped NLL | best − early-stopped NLL | best by val/mean_p (seeds) |"
             " its epochs | best by val/mean_p − NLL's best by it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (task, noise), cell in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        ref, ref_p = "nll" + ES, "nll" + ESP
        for k in [k for k in _entries() if k in cell]:
            runs = cell[k]
            acc = lambda o: bootstrap(np.stack(list(cell[o].values())), resamples=resamples) if o in cell else None  # noqa: E731
            diff = lambda a, b: (paired(cell, a, b, resamples) or (None,))[0]  # noqa: E731
            lines.append(
                f"| `{task}` ({roles[task]}), {noise:.0%} | {label(k)} | {len(runs)} | {format_ci(acc(k))} | "
                f"{format_ci(acc(k + ES))} | {','.join(map(str, epochs.get((task, noise, k + ES), [])))} | "
                f"{format_ci(diff(k + ES, k), signed=True)} | "
                f"{format_ci(diff(k, ref) if ref in cell else None, signed=True)} | "
                f"{format_ci(diff(k + ES, ref) if k != 'nll' and ref in cell else None, signed=True)} | "
                f"{format_ci(acc(k + ESP))} ({len(cell.get(k + ESP, ()))}) | "
                f"{','.join(map(str, epochs.get((task, noise, k + ESP), [])))} | "
                f"{format_ci(diff(k + ESP, ref_p) if k != 'nll' and ref_p in cell else None, signed=True)} |")
    return "\n".join(lines)


CONTROLLERS = ("plateau", "plateau_best", "plateau_p_best", "plateau_v3_best")  # the validation-aware designs
V3 = "adaptive_learn"  # the default controller's key
CHOSEN = "plateau_v3_best"  # the design the dev task chose (noise_study.CHOSEN)


def best_static_selected(cell: Cell) -> str | None:
    """The cell's best static objective at its last checkpoint or its best by either monitor (the most accurate
    option whose objective is static, among those with the cell's most seeds): what the target is measured against."""
    options = {k: v for k, v in cell.items() if is_static(split(k)[0])}
    if not options:
        return None
    most = max(len(v) for v in options.values())
    scores = {k: float(np.mean([x.mean() for x in v.values()])) for k, v in options.items() if len(v) == most}
    return max(scores, key=scores.get)


def target_table(all_cells: Mapping[tuple[str, str, float], Cell], resamples: int = 2000) -> str:
    """Issue 27's target, per cell with early stopping and per validation-aware controller (last checkpoint):
    paired differences to early-stopped NLL (by each monitor), to v3, and to the best static objective with early
    stopping; then the controller's own best by val/mean_p against that same option."""
    lines = ["| cell | controller | seeds | − NLL best by val/nll | − NLL best by val/mean_p | − v3 |"
             " − best static with early stopping (which) | its best by val/mean_p − the same |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (study, task, noise), cell in sorted(all_cells.items(), key=lambda kv: (kv[0][1], -kv[0][2])):
        if "nll" + ES not in cell:
            continue
        best = best_static_selected(cell)
        def diff(b: str | None, a: str) -> tuple[float, float, float] | None:
            return (paired(cell, a, b, resamples) or (None,))[0] if a in cell and b in cell else None

        for k in [k for k in CONTROLLERS if k in cell]:
            # The same selection on both sides: the controller's best checkpoint by val/mean_p (the shipped overlay
            # keeps it) against the best static objective with early stopping.
            nll_es, nll_esp, v3, to_best, best_p = (format_ci(diff(b, a), signed=True) for b, a in (
                ("nll" + ES, k), ("nll" + ESP, k), (V3, k), (best, k), (best, k + ESP)))
            lines.append(f"| `{task}` {noise:.0%} | {label(k)} | {len(cell[k])} | {nll_es} | {nll_esp} | {v3} | "
                         f"{to_best} ({label(best)}) | {best_p} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, sources: Mapping[str, Path] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "early_stop" / "early_stop.md"))
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples per interval")
    args = parser.parse_args(argv)
    sources = SOURCES if sources is None else sources
    all_cells, check = cells(sources)
    es_rows = read(sources["early_stop"])
    text = "\n\n".join([
        "### Early stopping against the objectives, and regret across the studies",
        f"- command: `python benchmarks/regret.py`; sources: " + ", ".join(
            f"{k} `{os.path.relpath(v, ROOT)}` ({len(read(v))} runs)" for k, v in sources.items()),
        f"- the early-stopping grid reruns noise-grid runs (same rows, order, noise and items, with a validation"
        f" added): {check['reproduced']} of {check['compared']} reproduce the earlier last checkpoint item by item; the"
        f" others differ in {check['differing_items']} answers in all (float rounding of code changed since), and the"
        " rerun replaces the earlier run in its cell",
        "Early stopping (validation after every epoch on the seed's held-out rows, noised at the training rate; "
        "`ModelCheckpoint(monitor='val/nll', save_top_k=1)`, and from 2026-12-07 also `monitor='val/mean_p', "
        "mode='max'` in the same runs (earlier runs have no such column: its seed count is given); held-out accuracy "
        "on the clean evaluation items, paired two-way bootstrap over the seeds both sides have):",
        early_stop_table(es_rows, args.bootstrap),
        "The validation-aware controllers against the target (last checkpoint; paired over the seeds both sides "
        "have; the best static objective with early stopping is the most accurate of every static objective's last "
        "checkpoint and its best by either monitor):",
        target_table(all_cells, args.bootstrap),
        "Regret: each option against its cell's best static objective (last checkpoint), paired; options run in "
        "fewer cells are judged on fewer:",
        regret_table(regret(all_cells, args.bootstrap)),
        f"Like for like: the same regret on the cells the chosen validation-aware controller ({label(CHOSEN)}) ran in,"
        " among the options run in every one of them:",
        regret_table(regret(all_cells, args.bootstrap, only=CHOSEN)),
        f"With validation: the same on the cells where {label(CHOSEN)} also has its best checkpoint by val/mean_p (the"
        " early-stopping grid), where every option can be kept at its best checkpoint by either monitor:",
        regret_table(regret(all_cells, args.bootstrap, only=CHOSEN + ESP)),
        head_to_head_line(head_to_head(all_cells, CHOSEN, V3, args.bootstrap), CHOSEN, V3),
    ]) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
