"""Where a training step's time goes: phase by phase per configuration, and the top ops.

One ``SFTModule`` trains on one fixed batch inside Lightning's fit loop, profiled by Lightning's
own ``SimpleProfiler``; each configuration is a separate fit of the same model and batch, and the
fits run in ``--rounds`` rounds, every other round in reverse order, so drift on a shared machine
hits every configuration alike. Phases (median over all timed steps, after each fit's warm-up
steps): forward (``training_step``: body, streamed
log p, objective, statistics), backward, the token-exact gradient rescale and logging
(``on_before_optimizer_step``), gradient clipping, the AdamW update (``optimizer_step`` minus the
closure's parts) and the rest (Lightning's loop, ``zero_grad``, callbacks). One extra step of the
first configuration runs under ``torch.profiler`` for the op table (not timed in the phases).

    python benchmarks/profile_step.py [--quick] [--append]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C

# SimpleProfiler action (by suffix) per phase; the update is optimizer_step minus its closure.
PHASES = {
    "forward": "SingleDeviceStrategy.training_step",
    "backward": "SingleDeviceStrategy.backward",
    "rescale + log": "SFTModule.on_before_optimizer_step",
    "clip": "SFTModule.configure_gradient_clipping",
}
STEP, OPTIMIZER_STEP = "run_training_batch", "SFTModule.optimizer_step"


def foreach_adamw(params) -> torch.optim.Optimizer:
    """The module's default AdamW settings, with the multi-tensor (foreach) update instead of fused."""
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.01, foreach=True, fused=False)


def configurations() -> list[tuple[str, dict]]:
    """(name, SFTModule keyword arguments) in table order; the module default first."""
    from bnll_lightning.logp_head import StreamingArgs
    from bnll_lightning.objectives import NLL, TopFraction

    return [
        ("NLL (module default: streamed, fused AdamW)", {"objective": NLL()}),
        ("NLL, AdamW foreach instead of fused", {"objective": NLL(), "optimizer": foreach_adamw}),
        ("NLL, full logits instead of streamed", {"objective": NLL(), "streaming": StreamingArgs(streamed=False)}),
        ("TopFraction(0.1)", {"objective": TopFraction(0.1)}),
    ]


def _durations(profiler, suffix: str) -> list[float]:
    keys = [k for k in profiler.recorded_durations if k == suffix or k.endswith("]" + suffix)]
    if len(keys) != 1:
        raise RuntimeError(f"expected one profiler action ending in {suffix!r}, found {keys}")
    return list(profiler.recorded_durations[keys[0]])


def run(model_dir: str, batch: dict, kwargs: dict, warmup: int, steps: int, work_dir: str,
        op_table: bool = False, top: int = 10) -> tuple[list[dict[str, float]], list[tuple[str, float, float]]]:
    """Fit ``warmup + steps`` (+1 profiled by torch.profiler if ``op_table``) steps; return the seconds
    per phase of each timed step and, if asked, the top ops of the extra step as
    (name, self seconds, share of all ops' self time)."""
    import lightning.pytorch as L
    from lightning.pytorch.profilers import SimpleProfiler
    from torch.profiler import ProfilerActivity, profile

    total = warmup + steps + int(op_table)
    ops: list[tuple[str, float, float]] = []

    class OpTable(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if op_table and batch_idx == warmup + steps:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if op_table and batch_idx == warmup + steps:
                self.prof.__exit__(None, None, None)
                events = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                total = sum(e.self_cpu_time_total for e in events)
                ops.extend((e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events[:top])

    profiler = SimpleProfiler()
    C.fit_on_batch(model_dir, batch, total, work_dir, [OpTable()], profiler=profiler, **kwargs)
    timed = slice(warmup, warmup + steps)
    series = {name: _durations(profiler, key)[timed] for name, key in PHASES.items()}
    steps_s, opt_s = (_durations(profiler, k)[timed] for k in (STEP, OPTIMIZER_STEP))
    phases = []
    for j, (step, opt) in enumerate(zip(steps_s, opt_s)):
        phase = {name: s[j] for name, s in series.items()}
        phase["AdamW update"] = opt - sum(phase.values())
        phase["rest (loop, zero_grad, callbacks)"] = step - opt
        phase["step"] = step
        phases.append(phase)
    return phases, ops


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per fit")
    parser.add_argument("--rounds", type=int, default=2, help="fits per configuration, alternating order")
    parser.add_argument("--top", type=int, default=10, help="rows of the op table")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.warmup, args.steps, args.rounds = 2, 32, 1, 2, 2
    threads = C.set_threads(args.threads)

    load0 = C.load_average()
    configs = configurations()
    samples: list[list[dict[str, float]]] = [[] for _ in configs]
    with tempfile.TemporaryDirectory(prefix="bnll_bench_") as work, C.quiet():
        n_params = C.save_random_model(f"{work}/model", **(C.TINY if args.quick else {}))
        batch = C.fixed_batch(args.batch_size, args.seq_len, C.embedded_config().vocab_size)
        for r in range(args.rounds):
            order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
            for i in order:
                name, kwargs = configs[i]
                first = r == 0 and i == 0  # the op table comes from one extra step of the first fit
                phase, ops = run(f"{work}/model", batch, kwargs, args.warmup, args.steps, work,
                                 op_table=first, top=args.top)
                samples[i].extend(phase)
                if first:
                    op_rows = ops
                step = C.median([s["step"] for s in phase])
                print(f"[profile_step] round {r + 1}: {name}: step {step:.3f} s", file=sys.stderr, flush=True)
    load1 = C.load_average()
    # Per phase, the median over every timed step of every round.
    results = [(name, {k: C.median([s[k] for s in samples[i]]) for k in samples[i][0]})
               for i, (name, _) in enumerate(configs)]

    columns = ["step", *PHASES, "AdamW update", "rest (loop, zero_grad, callbacks)"]
    reference = results[0][1]["step"]
    rows = [[name, *(C.fmt(phase[c]) for c in columns), C.fmt(phase["step"] / reference)] for name, phase in results]
    table = C.markdown_table(["configuration", *(f"{c} (s)" for c in columns), "step / default"], rows)
    ops_table = C.markdown_table(
        ["op (one default NLL step, torch.profiler)", "self CPU seconds", "share of the step's op time"],
        [[name, C.fmt(t), f"{100 * share:.1f} %"] for name, t, share in op_rows],
    )
    arch = "tiny (--quick)" if args.quick else "SmolLM2-135M architecture from its config"
    conditions = [
        f"model: {arch}, random init, {n_params / 1e6:.1f} M parameters, float32",
        f"batch: {args.batch_size} x {args.seq_len} random tokens, the first quarter of each row masked as prompt",
        "Lightning fit loop, Lightning's SimpleProfiler, gradient clipping 1.0, no logger; one fit per configuration",
        f"{args.rounds} fits per configuration in alternating order, each {args.warmup} warm-up + {args.steps}"
        " timed steps; per phase the median over all timed steps, in seconds (so the phases need not add up exactly)",
    ]
    return C.report(
        "Profile of a training step", "profile_step.py", args, argv, threads, table + "\n\n" + ops_table, conditions,
        load=(load0, load1),
    )


if __name__ == "__main__":
    main()
