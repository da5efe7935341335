"""Tables and plots of the noise study (``noise_study.py``) from its CSV: accuracy with paired intervals, curves."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import _common as C
from benchmarks import continuum as CT


def _entries():
    from benchmarks.noise_study import ENTRIES

    return ENTRIES


def _vec(items: str) -> np.ndarray:
    return np.frombuffer(items.encode(), dtype=np.uint8) - ord("0")


def groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, dict[int, dict[str, Any]]]]:
    """(task, noise) -> objective -> seed -> row (the base model's rows are not in it)."""
    out: dict[tuple[str, float], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        if r["objective"] != CT.BASE:
            out.setdefault((r["task"], r["noise"]), {}).setdefault(r["objective"], {})[r["seed"]] = r
    return out


def summarize(rows: Sequence[dict[str, Any]], resamples: int = 4000) -> list[dict[str, Any]]:
    """Per (task, noise): each objective's final accuracy [95 % CI] over its own seeds, Δ vs NLL, and the
    controllers against the best static objective and the ramp, each comparison paired over the seeds both
    runs have. The best static objective is chosen among those with the row's most seeds (a partly run
    objective is shown, not crowned)."""
    entries = _entries()
    base = {r["task"]: r for r in rows if r["objective"] == CT.BASE}
    out = []
    for (task, noise), by_key in sorted(groups(rows).items()):
        by_key = {k: by_key[k] for k in entries if k in by_key}

        def paired(a: str, b: str) -> tuple[float, float, float] | None:
            common = sorted(set(by_key.get(a, ())) & set(by_key.get(b, ())))
            if not common:
                return None
            mat = lambda k: np.stack([_vec(by_key[k][x]["items"]) for x in common])  # noqa: E731
            return CT.bootstrap(mat(a), mat(b), resamples)

        most = max(len(m) for m in by_key.values())
        s: dict[str, Any] = {"task": task, "noise": noise, "seeds": most,
                             "role": next(iter(next(iter(by_key.values())).values()))["role"], "base": base.get(task),
                             "objectives": {}}  # fmt: skip
        for k, runs in by_key.items():
            seeds = sorted(runs)
            alphas = [runs[x]["alpha_mean"] for x in seeds if runs[x]["alpha_mean"] is not None]
            s["objectives"][k] = {
                "seeds": len(seeds),
                "accuracy": CT.bootstrap(np.stack([_vec(runs[x]["items"]) for x in seeds]), resamples=resamples),
                "vs_nll": paired(k, "nll") if "nll" in by_key and k != "nll" else None,
                "alpha_mean": sum(alphas) / len(alphas) if alphas else None,
            }
        static = {k: v["accuracy"][0] for k, v in s["objectives"].items()
                  if entries[k].static and v["seeds"] == most}  # fmt: skip
        if static:
            best = max(static, key=static.get)
            s["best_static"] = best
            for k, v in s["objectives"].items():
                v["vs_best"] = paired(k, best) if k != best else None
                if not entries[k].static and "linear" in by_key and k != "linear":
                    v["vs_linear"] = paired(k, "linear")
            # the bootstrap is seeded: k − best's upper bound is minus best − k's lower bound, no second draw
            s["tied_with_best"] = [k for k in static if k == best or s["objectives"][k]["vs_best"][2] >= 0.0]
        out.append(s)
    return out


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    entries = _entries()
    acc, ctl = [], []
    for s in summaries:
        head = f"{s['task']} ({s['role']}), noise {s['noise']:.0%}"
        for k, v in s["objectives"].items():
            mark = " (best static)" if k == s.get("best_static") else ""
            alpha = "–" if v["alpha_mean"] is None else f"{v['alpha_mean']:.2f}"
            acc.append([head, entries[k].label + mark, str(v["seeds"]), CT._ci(v["accuracy"]), CT._ci(v["vs_nll"], True),
                        CT._ci(v.get("vs_best"), True), alpha])  # fmt: skip
            if not entries[k].static and v.get("vs_best") is not None:
                ctl.append([head, entries[k].label, entries[s["best_static"]].label, CT._ci(v["vs_best"], True),
                            CT._verdict(v["vs_best"]), CT._ci(v.get("vs_linear"), True), CT._verdict(v.get("vs_linear"))])
    return "\n".join([
        "Final held-out accuracy (end of training; mean over seeds × items, 95 % two-way bootstrap interval);"
        " Δ vs NLL and vs the row's best static objective, paired over seeds × items:", "",
        C.markdown_table(["task (role), noise", "objective", "seeds", "accuracy [95 % CI]", "Δ vs NLL [95 % CI]",
                          "Δ vs best static [95 % CI]", "mean α"], acc),
        "", "Controllers against the best static objective and against the ramp (paired):", "",
        C.markdown_table(["task (role), noise", "controller", "best static", "Δ vs best static", "verdict",
                          "Δ vs LinearAlpha", "verdict"], ctl),
    ])  # fmt: skip


# The at-a-glance columns: static objectives from NLL towards the prior, then the controllers.
OVERVIEW = ("nll", "alpha05", "negprob", "dft", "eaft", "asft", "token", "linear", "adaptive", "adaptive_median",
            "adaptive_learn")  # fmt: skip


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def overview_table(summaries: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> str:
    """At a glance: one row per task and noise rate, one column per objective (``keys``: those run), the
    final accuracy; the best static objective in bold; a cell with fewer seeds than its row says how many."""
    entries = _entries()
    present = {k for s in summaries for k in s["objectives"]}
    keys = [k for k in (keys or OVERVIEW) if k in present]
    lines = []
    for s in summaries:
        cells = []
        for k in keys:
            v = s["objectives"].get(k)
            if v is None:
                cells.append("–")
                continue
            cell = f"{v['accuracy'][0]:.3f}"
            cell = f"**{cell}**" if k == s.get("best_static") else cell
            cells.append(cell if v["seeds"] == s["seeds"] else f"{cell} ({_seeds(v['seeds'])})")
        lines.append([f"`{s['task']}` ({s['role']}), {s['noise']:.0%} noise, {_seeds(s['seeds'])}", *cells])
    return C.markdown_table(["task (role), noise, seeds", *(entries[k].label for k in keys)], lines)


def base_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["objective"] == CT.BASE:
            counts = json.loads(r["pool"] or "{}")
            curve = json.loads(r["curve"])[0]
            lines.append([r["task"], r["role"], f"{r['base_mean_p']:.3f}", f"{r['base_geometric_mean_p']:.3f}",
                          f"{r['accuracy']:.3f}", str(r["n"]), f"{counts.get('kept', '–')}/{counts.get('asked', '–')}",
                          f"{curve['probe_nll']:.3f}"])  # fmt: skip
    return C.markdown_table(["task", "role", "base mean p (training targets)", "geometric mean p", "base accuracy",
                             "eval items", "pool kept/asked", "held-out probe NLL"], lines)  # fmt: skip


def plot_curves(rows: Sequence[dict[str, Any]], path: str | None = None, resamples: int = 1000):
    """Held-out accuracy over epochs per objective (mean and 95 % two-way bootstrap band), one panel
    per task (rows) and noise rate (columns)."""
    import matplotlib
    from matplotlib.figure import Figure

    entries = _entries()
    grouped = groups(rows)
    tasks = list(dict.fromkeys(t for t, _ in sorted(grouped)))
    noises = sorted({n for _, n in grouped})
    base = {r["task"]: r for r in rows if r["objective"] == CT.BASE}
    # One colour per objective across every panel (panels hold different objectives): tab10, then 4 more.
    keys = sorted({k for panel in grouped.values() for k in panel}, key=list(entries).index)
    palette = [*matplotlib.colormaps["tab10"].colors, "black", "gold", "navy", "lime"]
    colour = {k: palette[i % len(palette)] for i, k in enumerate(keys)}
    fig = Figure(figsize=(3.6 * max(len(noises), 1) + 0.5, 2.9 * max(len(tasks), 1) + 0.8))
    for i, task in enumerate(tasks):
        for j, noise in enumerate(noises):
            ax = fig.add_subplot(len(tasks), len(noises), i * len(noises) + j + 1)
            if (task, noise) not in grouped:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{task}: not run at noise {noise:.0%}", ha="center", va="center", fontsize=8)
                continue
            for key, by_seed in sorted(grouped[(task, noise)].items(), key=lambda kv: list(entries).index(kv[0])):
                curves = [json.loads(r["curve"]) for r in by_seed.values()]
                epochs = [p["epoch"] for p in curves[0]]
                if task in base:
                    epochs = [0, *epochs]
                mean, lo, hi = [], [], []
                for e_idx, _ in enumerate(epochs):
                    if task in base and e_idx == 0:
                        v = _vec(base[task]["items"])[None, :]
                    else:
                        k = e_idx - (1 if task in base else 0)
                        v = np.stack([_vec(cv[k]["items"]) for cv in curves])
                    m, a, b = CT.bootstrap(v, resamples=resamples)
                    mean.append(m), lo.append(a), hi.append(b)
                style = "-" if entries[key].static else "--"
                ax.plot(epochs, mean, style, color=colour[key], label=entries[key].label, linewidth=1.2)
                ax.fill_between(epochs, lo, hi, color=colour[key], alpha=0.12)
            ax.set_title(f"{task}, noise {noise:.0%}", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("held-out accuracy", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    if handles:
        order = [entries[k].label for k in keys]
        labels, handles = zip(*sorted(zip(labels, handles), key=lambda lh: order.index(lh[0])))
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1))
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write(args, argv, config, csv_path, threads, load, seconds) -> str:
    """The report: markdown (printed, written to ``--out``, appended with --append) and the plot."""
    from benchmarks.noise_study import NOISE_TASKS, read_csv

    rows = [r for r in read_csv(csv_path, config) if r["task"] in args.tasks]
    summaries = summarize(rows, args.bootstrap)
    if rows:
        plot_curves(rows, os.path.join(args.out, "curves.png"), resamples=min(args.bootstrap, 1000))
        plot_statistics(rows, os.path.join(args.out, "statistics.png"))
    done = sum((r["train_seconds"] or 0) + (r["eval_seconds"] or 0) for r in rows)
    table = "\n".join(["Tasks and the base model (training targets of seed 0):", "", base_table(rows), "",
                       "At a glance (final held-out accuracy; best static objective in bold; intervals below):", "",
                       overview_table(summaries), "", markdown(summaries), "", "The diagnosis against the outcome:", "", diagnosis_table(summaries), "",
                       "What a controller could read during NLL training (mean over seeds):",
                       "", statistics_table(rows)])  # fmt: skip
    conditions = [
        f"model: {args.model}, {args.precision}, {args.accelerator}; every run starts from the same in-memory weights",
        f"fine-tune: {args.epochs} epochs over {args.num_train} rows per seed (reverse3_long: 64), batch {args.batch_size},"
        f" AdamW lr {args.lr:g} betas (0.9, 0.95) wd 0.01, {args.warmup:g} warm-up then cosine to 0, grad clip 1.0",
        f"evaluation: held-out items (none in any training or pool row), greedy, max_new_tokens {args.max_new_tokens},"
        f" the task's checker against the truth; after epochs {args.eval_epochs}; the last is the result; seeds planned"
        f" {args.seeds} (the tables' seeds column: those each objective has finished; a comparison pairs the seeds both have); intervals: two-way"
        f" (seeds x items) bootstrap, {args.bootstrap} resamples",
        "tasks: " + "; ".join(f"{t} = {NOISE_TASKS[t].why} ({NOISE_TASKS[t].role})" for t in args.tasks),
        f"{len(rows)} runs in the CSV for this configuration ({config}); run time summed {done / 60:.0f} min;"
        f" this invocation {seconds / 60:.1f} min; outputs in {args.out}",
    ]
    text = C.report("Noise study: the model-strong end under label noise", "noise_study.py", args, argv, threads, table,
                    conditions, load=load)  # fmt: skip
    with open(os.path.join(args.out, "noise_study.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def statistics_table(rows: Sequence[dict[str, Any]], objective: str = "nll") -> str:
    """What a controller could read, per task and noise rate, from ``objective``'s runs (mean over seeds):
    the training batch's mean, median and 10 % quantile of p and share under τ in the first and the
    last epoch, and the clean held-out probe's NLL after each evaluated epoch."""
    lines = []
    for (task, noise), by_key in sorted(groups(rows).items()):
        runs = list(by_key.get(objective, {}).values())
        if not runs:
            continue
        traces = [np.array(json.loads(r["trace"])) for r in runs]
        steps = min(len(t) for t in traces)
        per_epoch = steps // runs[0]["epochs"]
        first = np.mean([t[:per_epoch].mean(axis=0) for t in traces], axis=0)
        last = np.mean([t[steps - per_epoch:steps].mean(axis=0) for t in traces], axis=0)
        probe = np.mean([[p["probe_nll"] for p in json.loads(r["curve"])] for r in runs], axis=0)
        epochs = [p["epoch"] for p in json.loads(runs[0]["curve"])]
        lines.append([f"{task} ({runs[0]['role']})", f"{noise:.0%}", str(len(runs)),
                      *(f"{a:.3f} → {b:.3f}" for a, b in zip(first, last)),
                      ", ".join(f"{e}: {v:.3f}" for e, v in zip(epochs, probe))])  # fmt: skip
    return C.markdown_table(["task (role)", "noise", "seeds", "mean p (epoch 1 → last)", "median p", "10 % quantile p",
                             f"share p < {0.2}", "held-out probe NLL by epoch"], lines)  # fmt: skip


def plot_statistics(rows: Sequence[dict[str, Any]], path: str | None = None, objective: str = "nll"):
    """Per task: the training batch's mean, median and 10 % quantile of p over the steps of ``objective``'s
    runs (mean over seeds), one line style per statistic, one colour per noise rate."""
    from matplotlib.figure import Figure

    grouped = groups(rows)
    tasks = list(dict.fromkeys(t for t, _ in sorted(grouped)))
    fig = Figure(figsize=(3.6 * max(len(tasks), 1), 3.2))
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for c, noise in enumerate(sorted(n for t, n in grouped if t == task)):
            runs = list(grouped[(task, noise)].get(objective, {}).values())
            if not runs:
                continue
            traces = [np.array(json.loads(r["trace"])) for r in runs]
            steps = min(len(t) for t in traces)
            mean = np.mean([t[:steps] for t in traces], axis=0)
            x = np.arange(1, steps + 1)
            for col, style, name in ((0, "-", "mean"), (1, ":", "median"), (2, "--", "10 % quantile")):
                ax.plot(x, mean[:, col], style, color=f"C{c}", linewidth=1.1,
                        label=f"{name}, noise {noise:.0%}" if i == 0 else None)  # fmt: skip
        ax.set_title(f"{task}: {objective}", fontsize=8)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=3, fontsize=6)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def diagnosis_table(summaries: Sequence[dict[str, Any]]) -> str:
    """``probe``'s rules (the paper's mean p of the training targets, and base accuracy; −p at >= 0.5,
    else NLL) against the study's outcome: a hit when the pick is the best static objective or tied with it."""
    entries = _entries()
    lines, hits = [], {}
    for s in summaries:
        base = s["base"]
        if base is None or "tied_with_best" not in s:
            continue
        for rule, value in (("mean p (paper)", base["base_mean_p"]), ("base accuracy", base["accuracy"])):
            pick = "negprob" if value >= 0.5 else "nll"
            if pick not in s["objectives"]:
                continue
            hit = pick in s["tied_with_best"]
            hits.setdefault(rule, []).append(hit)
            lines.append([f"{s['task']} ({s['role']}), noise {s['noise']:.0%}", rule, f"{value:.3f}", entries[pick].label,
                          ", ".join(entries[k].label for k in s["tied_with_best"]), "hit" if hit else "miss"])
    table = C.markdown_table(["task (role), noise", "rule", "value", "recommends", "best static and its ties", "outcome"],
                             lines)  # fmt: skip
    return table + "\n\nHit rate: " + "; ".join(f"{r} {sum(h)}/{len(h)}" for r, h in hits.items())
