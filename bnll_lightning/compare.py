"""Objectives compared on the same held-out items: paired two-way bootstrap, table, plot, recommendation.

The statistics every comparison here uses (``study``, ``compare``, ``benchmarks/continuum.py``):

* :func:`bootstrap` - the mean of a [seeds, items] array of per-item scores, or of the paired difference
  of two, with a 95 % interval from resampling seeds and items together;
* :func:`summarize` - each objective's accuracy, its paired difference to a reference (NLL) and to the
  best objective, and which objectives are tied with the best (the interval of the difference holds 0);
* :func:`markdown`, :func:`plot`, :func:`recommendation` - the table, the PNG and the YAML to paste;
* :func:`read_run` / :func:`match_items` - per-item scores from the ``predictions/step_N.jsonl`` that
  :class:`~bnll_lightning.callbacks.GenerationEval` writes, paired by row index across runs, refused
  when two runs were scored on different items;
* :func:`checkpoints_of` / :func:`delete_checkpoints` - what the compared runs hold that a comparison never
  reads. The runs are plain ``fit`` runs: their ``checkpoints/`` hold the weights and the optimizer state that
  ``--ckpt_path last`` resumes or extends them from (1.6 GB for the embedded model), so compare says how much
  they hold and deletes them only when asked (a run still training must keep them).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnll_lightning.disk import by_place

__all__ = [
    "Comparison",
    "RunItems",
    "StudyError",
    "bootstrap",
    "checkpoints_of",
    "delete_checkpoints",
    "find_runs",
    "format_ci",
    "markdown",
    "match_items",
    "plot",
    "read_run",
    "recommendation",
    "summarize",
    "verdict",
]

CI = tuple[float, float, float]  # (mean, 2.5 % quantile, 97.5 % quantile)
BASE = "base"  # the base model's row: scored, never trained, not a candidate


class StudyError(ValueError):
    """Input a study or a comparison cannot use (an unknown objective, too few held-out rows, runs
    scored on different items): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- statistics


def bootstrap(a: Any, b: Any = None, resamples: int = 4000, seed: int = 0) -> CI:
    """Mean of ``a`` (or of ``a − b``, paired) and its 95 % percentile interval.

    ``a`` and ``b`` are [seeds, items] arrays of per-item scores (0/1, or a share of samples right) over
    the same seeds and items. Each resample draws seeds and items with replacement, independently (a
    two-way bootstrap: seed-to-seed variation of the training runs and item-to-item variation of the
    test set both count); the paired difference uses the same draw for both arrays.
    """
    # Own code, not scipy.stats.bootstrap: that resamples one axis of observations, and this interval
    # needs seeds and items drawn independently (a crossed design) with the pairing kept.
    x = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"need a [seeds, items] array, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    s, n = x.shape
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # bounded memory: 500 x seeds x items at a time
        k = min(500, resamples - start)
        si = rng.integers(0, s, size=(k, s))
        ii = rng.integers(0, n, size=(k, n))
        means[start:start + k] = x[si[:, :, None], ii[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def verdict(x: CI | None) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0, else ``tied`` (``–``: none)."""
    if x is None:
        return "–"
    if x[1] > 0:
        return "better"
    if x[2] < 0:
        return "worse"
    return "tied"


def format_ci(x: CI | None, signed: bool = False) -> str:
    """``0.512 [0.470, 0.553]`` (signed: ``+0.012 [-0.020, +0.044]``); ``–`` for None."""
    if x is None:
        return "–"
    m, lo, hi = x
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


@dataclass
class Comparison:
    """What :func:`summarize` finds: per objective its seeds, accuracy and paired differences."""

    items: int
    """Items each run was scored on."""
    seeds: dict[str, list[Hashable]]
    accuracy: dict[str, CI]
    vs_reference: dict[str, CI | None]
    """objective − reference over their common seeds (None for the reference itself)."""
    vs_best: dict[str, CI | None]
    """objective − best over their common seeds (None for the best itself)."""
    best: str
    tied: list[str]
    """The best and every objective whose difference to it has an interval holding 0."""
    reference: str | None = None
    base: CI | None = None
    """The base model's accuracy (one scoring; the interval is over items), when it was scored."""
    resamples: int = 4000
    labels: dict[str, str] = field(default_factory=dict)


def _stack(runs: Mapping[Hashable, np.ndarray], seeds: Sequence[Hashable]) -> np.ndarray:
    return np.stack([np.asarray(runs[s], dtype=np.float64) for s in seeds])


def _paired(a: Mapping[Hashable, np.ndarray], b: Mapping[Hashable, np.ndarray], resamples: int) -> CI | None:
    common = [s for s in a if s in b]
    return bootstrap(_stack(a, common), _stack(b, common), resamples) if common else None


def summarize(
    scores: Mapping[str, Mapping[Hashable, Any]],
    reference: str | None = "nll",
    resamples: int = 4000,
    labels: Mapping[str, str] | None = None,
) -> Comparison:
    """Accuracy of each objective over its seeds × items, its paired difference to ``reference`` and to
    the best objective (seeds they share), and the objectives tied with the best.

    Args:
        scores: objective -> seed -> per-item scores (a 1-D array over the same items for every run);
            an objective named ``"base"`` is the base model (reported, never a candidate).
        reference: The objective differences are taken against (NLL); absent from ``scores``: none.
        resamples: Bootstrap resamples per interval.
        labels: Display names for the table and plot (default: the keys).
    """
    scores = {k: {s: np.asarray(v, dtype=np.float64) for s, v in runs.items()} for k, runs in scores.items() if runs}
    base = scores.pop(BASE, None)
    if not scores:
        raise StudyError("no finished runs to compare")
    sizes = {v.shape for runs in scores.values() for v in runs.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise StudyError(f"every run must be scored on the same items; got per-run shapes {sorted(sizes)}")
    reference = reference if reference in scores else None
    accuracy = {k: bootstrap(_stack(runs, list(runs)), resamples=resamples) for k, runs in scores.items()}
    best = max(accuracy, key=lambda k: accuracy[k][0])
    vs_best = {k: None if k == best else _paired(runs, scores[best], resamples) for k, runs in scores.items()}
    vs_ref = {k: None if k == reference or reference is None else _paired(runs, scores[reference], resamples)
              for k, runs in scores.items()}  # fmt: skip
    tied = [k for k in scores if k == best or (vs_best[k] is not None and vs_best[k][2] >= 0.0)]
    base_ci = bootstrap(_stack(base, list(base)), resamples=resamples) if base else None
    return Comparison(
        items=next(iter(sizes))[0], seeds={k: list(runs) for k, runs in scores.items()}, accuracy=accuracy,
        vs_reference=vs_ref, vs_best=vs_best, best=best, tied=tied, reference=reference, base=base_ci,
        resamples=resamples, labels={k: (labels or {}).get(k, k) for k in [*scores, BASE]},
    )  # fmt: skip


# ----------------------------------------------------------------------------- outputs


def _status(c: Comparison, key: str) -> str:
    if key == c.best:
        return "best"
    return "tied with best" if key in c.tied else "worse than best"


def markdown(c: Comparison) -> str:
    """The comparison as a markdown table, with a line saying what the intervals are."""
    ref = c.labels.get(c.reference, c.reference) if c.reference else None
    head = ["objective", "seeds", "accuracy [95 % CI]", f"Δ vs {ref or 'reference'} [95 % CI]",
            f"Δ vs best ({c.labels[c.best]}) [95 % CI]", "verdict"]  # fmt: skip
    rows = []
    if c.base is not None:
        rows.append(["base model (not fine-tuned)", "–", format_ci(c.base), "–", "–", "–"])
    for key in sorted(c.accuracy, key=lambda k: -c.accuracy[k][0]):
        rows.append([c.labels[key], str(len(c.seeds[key])), format_ci(c.accuracy[key]),
                     "reference" if key == c.reference else format_ci(c.vs_reference[key], True),
                     "–" if key == c.best else format_ci(c.vs_best[key], True), _status(c, key)])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    seeds = sorted({len(s) for s in c.seeds.values()})
    lines += ["", f"Accuracy on {c.items} held-out items, mean over {'/'.join(map(str, seeds))} seed(s) × items; "
              f"95 % intervals from a two-way bootstrap (seeds and items resampled, {c.resamples} resamples); "
              "differences paired over the seeds both objectives ran and the same items. Tied: the interval of "
              "the difference holds 0." + _one_seed(c)]  # fmt: skip
    return "\n".join(lines)


def _one_seed(c: Comparison) -> str:
    """A warning when some objective ran once: its intervals then hold the items' variation, not the seeds'."""
    once = [c.labels[k] for k, seeds in c.seeds.items() if len(seeds) == 1]
    if not once:
        return ""
    return (f" One seed for {', '.join(once)}: those intervals hold item-to-item variation only, not run-to-run; "
            "run 2 or more seeds before trusting a verdict.")


def plot(c: Comparison, path: str | Path, title: str = "") -> bool:
    """Accuracy per objective with its 95 % interval (dotted: the base model) as a PNG at ``path``;
    False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    keys = sorted(c.accuracy, key=lambda k: -c.accuracy[k][0])
    fig = Figure(figsize=(1.1 * len(keys) + 2.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for x, key in enumerate(keys):
        m, lo, hi = c.accuracy[key]
        color = "C2" if key == c.best else ("C0" if key in c.tied else "C3")
        ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=4)
    if c.base is not None:
        ax.axhline(c.base[0], color="grey", linestyle=":", linewidth=1, label="base model")
        ax.legend(fontsize=8, loc="best")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([c.labels[k] for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"accuracy on {c.items} held-out items (95 % CI)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "green: best, blue: tied with it, red: worse", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return True


def recommendation(c: Comparison, configs: Mapping[str, Mapping[str, Any]] | None = None, note: str = "") -> str:
    """YAML to paste into the job config: the recommended objective's ``model:`` keys, with comments that
    say what the intervals say.

    NLL (the reference) is kept unless another objective beats it with an interval that excludes 0:
    ``tied`` means the study cannot tell the objectives apart, and the standard stays. Without a
    reference the best is recommended and the ones tied with it are listed.
    """
    import yaml

    best, ref, name = c.best, c.reference, c.labels
    lines = ["# bnll_lightning objective recommendation: paste the model: keys into your job config"]
    lines += [f"# {line}" for line in note.splitlines() if line]
    if ref is not None and ref != best and ref not in c.tied:
        pick = best
        lines.append(f"# verdict: {name[best]} is better than {name[ref]}: {format_ci(c.vs_reference[best], True)}"
                     " (95 % interval of the paired difference excludes 0)")  # fmt: skip
    elif ref is not None:
        pick = ref
        others = [name[k] for k in c.tied if k != ref]
        if others:
            ahead = "" if best == ref else f" (best: {name[best]}, {format_ci(c.vs_reference[best], True)} vs {name[ref]})"
            lines.append(f"# verdict: tied: {', '.join(others)} and {name[ref]} cannot be told apart{ahead}; keep "
                         f"{name[ref]}, the standard")  # fmt: skip
        else:
            lines.append(f"# verdict: {name[ref]} is better than every other objective measured")
    else:
        pick = best
        others = [name[k] for k in c.tied if k != best]
        lines.append(f"# verdict: tied: {name[best]} with {', '.join(others)} (any of them)" if others
                     else f"# verdict: {name[best]} is better than every other objective measured")  # fmt: skip
    if warning := _one_seed(c):
        lines.append("#" + warning)
    lines.append("# accuracy: " + "; ".join(f"{name[k]} {format_ci(c.accuracy[k])}" for k in c.accuracy))
    config = (configs or {}).get(pick)
    if config is None:
        lines.append(f"# recommended: {name[pick]} (its config was not saved with the runs: use its overlay)")
        return "\n".join(lines) + "\n"
    lines.append(f"# recommended: {name[pick]}")
    return "\n".join(lines) + "\n" + yaml.safe_dump({"model": dict(config)}, sort_keys=False)


# ----------------------------------------------------------------------------- runs made with fit + GenerationEval

_STEP = re.compile(r"step_(\d+)\.jsonl$")


@dataclass
class RunItems:
    """One run's per-item scores, read from a ``predictions/step_N.jsonl``."""

    path: Path
    """The predictions file."""
    label: str
    """The objective: the run's log-directory name (the objective's tag under ``name: auto``)."""
    seed: Hashable
    scores: np.ndarray
    """Per row index: the share of its samples judged right (0/1 with greedy decoding)."""
    keys: list[tuple[str, str]]
    """Per row index: (prompt, answer), what says two runs scored the same item."""
    config: dict[str, Any] | None = None
    """The objective's keys of the run's saved ``config.yaml`` (``model.objective``, ``alpha_controller``,
    ``warm_start_batches``), for the recommendation; None without one."""


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories among ``paths``: each path with a ``predictions/`` folder, or every
    ``version_*`` below it that has one (``runs/demo/NLL`` gives all its versions)."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "predictions").is_dir():
            runs.append(path)
            continue
        found = sorted((p for p in path.glob("version_*") if (p / "predictions").is_dir()),
                       key=lambda p: int(p.name[8:]) if p.name[8:].isdigit() else -1)  # fmt: skip
        if not found:
            raise StudyError(f"{path}: no predictions/step_N.jsonl in it or in a version_* below it (fit with "
                             "bnll_lightning.callbacks.GenerationEval in trainer.callbacks writes them)")
        runs += found
    return runs


def read_run(run_dir: str | Path, step: int | None = None) -> RunItems:
    """The scores of ``run_dir``'s predictions at ``step`` (None: the last step it was scored at),
    labelled by the run's log-directory name and seeded by its ``config.yaml``'s ``seed_everything``."""
    run_dir = Path(run_dir)
    files = {int(m.group(1)): p for p in (run_dir / "predictions").glob("step_*.jsonl") if (m := _STEP.search(p.name))}
    if not files:
        raise StudyError(f"{run_dir}/predictions: no step_N.jsonl files")
    if step is not None and step not in files:
        raise StudyError(f"{run_dir}/predictions: no step_{step}.jsonl (steps: {', '.join(map(str, sorted(files)))})")
    path = files[max(files) if step is None else step]
    by_index: dict[int, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_index.setdefault(int(record["index"]), []).append(record)
            except (ValueError, KeyError, TypeError) as err:
                raise StudyError(f"{path}:{number}: not a GenerationEval prediction ({err})") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise StudyError(f"{path}: row indices are not 0..{len(by_index) - 1}: a partial predictions file")
    records = [by_index[i] for i in range(len(by_index))]
    scores = np.array([np.mean([bool(r.get("correct")) for r in rs]) for rs in records])
    keys = [(str(rs[0].get("prompt")), str(rs[0].get("answer"))) for rs in records]
    label = run_dir.parent.name if run_dir.name.startswith("version_") else run_dir.name
    saved = _saved_config(run_dir)
    seed = saved.get("seed_everything")
    model = saved.get("model") if isinstance(saved.get("model"), dict) else None
    config = None if model is None else {k: model.get(k) for k in ("objective", "alpha_controller", "warm_start_batches")}
    # Runs without a known seed (no config.yaml) pair by their directory name.
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else run_dir.name
    return RunItems(path, label, seed, scores, keys, config)


def _saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as LightningCLI saved it (``config.yaml``); {} without one."""
    import yaml

    try:
        with open(run_dir / "config.yaml", encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def match_items(runs: Sequence[RunItems]) -> dict[str, dict[Hashable, np.ndarray]]:
    """label -> seed -> scores, after checking that every run scored the same items in the same order;
    two runs of one label with the same seed are told apart by their directory."""
    if not runs:
        raise StudyError("no runs to compare")
    first = runs[0]
    for run in runs[1:]:
        if run.keys == first.keys:
            continue
        if len(run.keys) != len(first.keys):
            why = f"{len(first.keys)} items against {len(run.keys)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(first.keys, run.keys)) if a != b)
            why = f"item {i} is {_short(first.keys[i][0])!r} against {_short(run.keys[i][0])!r}"
        raise StudyError(f"{first.path} and {run.path} were scored on different items ({why}); compare needs runs "
                         "scored on the same validation rows (same data.val or split, same GenerationEval num_rows)")
    out: dict[str, dict[Hashable, np.ndarray]] = {}
    for run in runs:
        seeds = out.setdefault(run.label, {})
        seed = run.seed if run.seed not in seeds else f"{run.seed}@{run.path.parent.parent.name}"
        seeds[seed] = run.scores
    return out


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def checkpoints_of(runs: Sequence[RunItems]) -> dict[Path, int]:
    """The ``checkpoints/`` folder of each run (beside its ``predictions/``) that has one, and its bytes."""
    folders = {run.path.parent.parent / "checkpoints" for run in runs}
    return {folder: by_place({"checkpoints": folder})["checkpoints"] for folder in sorted(folders) if folder.is_dir()}


def delete_checkpoints(found: Mapping[Path, int]) -> int:
    """Remove the folders :func:`checkpoints_of` found, once their runs are compared; returns the bytes freed."""
    for folder in found:
        shutil.rmtree(folder)
    return sum(found.values())
