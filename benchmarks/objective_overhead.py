"""Optimizer-step time of each objective divided by NLL's: same model, same batch, same run.

One ``SFTModule`` (streamed log p, its default AdamW) trains on one fixed batch inside Lightning's
fit loop; a callback sets the objective (and the alpha controller) before every step, round-robin:
one untimed warm-up round, then ``--rounds`` rounds, each in a fresh random order, so drift on a
shared machine hits every objective alike. A step is timed from ``on_train_batch_start`` to
``on_train_batch_end``: forward, objective, backward, clipping, AdamW step, the module's per-step
statistics and logging. Reported: median step time / median NLL step time, the min-max of the
per-round ratios, and a second NLL entry (NLL against itself) that shows the noise floor.

    python benchmarks/objective_overhead.py [--quick] [--append]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C
from bnll_lightning.logp_head import StreamingArgs

TARGET = 1.03  # an objective may cost at most 3 % over NLL per optimizer step


ASFT_NAME = "ASFT(0.1), float32 reference = the model"
REFERENCE_ROW = "ASFT, of which the reference's forward"


def objectives(model_dir: str | None = None) -> list[tuple[str, object, object]]:
    """(name, objective, alpha controller or None) in table order; NLL first. With ``model_dir``,
    ASFT's frozen reference is loaded from it (the same model, float32, as SFTModule would)."""
    from bnll_lightning.alpha import AdaptiveAlpha
    from bnll_lightning.objectives import (
        ASFT, DFT, EAFT, NLL, AlphaFamily, Focal, NegProb, ThresholdedNLL, TokenAlpha, TopFraction,
    )

    asft = ASFT(0.1)
    if model_dir is not None:
        from bnll_lightning.reference import load_reference

        asft.bind_reference(load_reference(asft, model_dir))
    return [
        ("NLL", NLL(), None),
        ("NLL again (noise floor)", NLL(), None),
        ("NegProb", NegProb(), None),
        ("AlphaFamily(10)", AlphaFamily(10.0), None),
        ("ThresholdedNLL(0.2)", ThresholdedNLL(0.2), None),
        ("TopFraction(0.1)", TopFraction(0.1), None),
        ("DFT", DFT(), None),
        ("Focal(2)", Focal(2.0), None),
        ("AlphaFamily + AdaptiveAlpha", AlphaFamily(0.0), AdaptiveAlpha()),
        ("EAFT(k=20)", EAFT(1.0, k=20), None),
        ("TokenAlpha(1), signal p", TokenAlpha(1.0), None),
        ("TokenAlpha(1), signal entropy", TokenAlpha(1.0, signal="entropy"), None),
        ("TokenAlpha + AdaptiveAlpha", TokenAlpha(0.0), AdaptiveAlpha()),
        (ASFT_NAME, asft, None),
    ]


def _timed_reference(objective: object, seconds: list[float]) -> None:
    """Record the wall time of each forward of ``objective``'s reference model into ``seconds``."""
    reference = getattr(objective, "reference", None)
    if reference is None:
        return
    forward = reference.hidden_and_head

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    reference.hidden_and_head = timed


def schedule(n: int, rounds: int, seed: int = 0) -> list[int]:
    """Entry index per step: a warm-up round in table order, then ``rounds`` shuffled rounds."""
    rng = random.Random(seed)
    order = list(range(n))
    for _ in range(rounds):
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order


def run(
    model_dir: str, batch: dict, rounds: int, streamed: bool, work_dir: str
) -> tuple[list[str], list[list[float]], list[float]]:
    """Train round-robin; return the entry names, each entry's timed step seconds (one per round)
    and the seconds of the ASFT reference's forward in each timed ASFT step."""
    import lightning.pytorch as L

    entries = objectives(model_dir)
    order = schedule(len(entries), rounds)
    times: list[list[float]] = [[] for _ in entries]
    reference_seconds: list[float] = []
    for _, objective, _ in entries:
        _timed_reference(objective, reference_seconds)

    class RoundRobin(L.Callback):
        def __init__(self) -> None:
            self.step, self.t0 = 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _, objective, controller = entries[order[self.step]]
            pl_module.objective, pl_module.alpha_controller = objective, controller
            if controller is not None:
                objective.set_alpha(controller.alpha)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.perf_counter() - self.t0
            if self.step >= len(entries):  # the first round is the warm-up
                times[order[self.step]].append(elapsed)
            elif pl_module.objective.reference is not None:
                reference_seconds.pop()  # the warm-up's reference forward is not timed either
            self.step += 1
            print(f"[objective_overhead] step {self.step}/{len(order)} {entries[order[self.step - 1]][0]}:"
                  f" {elapsed:.3f} s", file=sys.stderr, flush=True)

    C.fit_on_batch(model_dir, batch, len(order), work_dir, [RoundRobin()], streaming=StreamingArgs(streamed))
    if any(len(t) != rounds for t in times) or len(reference_seconds) != rounds:
        raise RuntimeError(f"expected {rounds} timed steps per objective, got {[len(t) for t in times]}"
                           f" and {len(reference_seconds)} reference forwards")
    return [name for name, _, _ in entries], times, reference_seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: SmolLM2-135M's 30)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    parser.add_argument("--naive", action="store_true", help="full-logits log p instead of the streamed default")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.rounds = 2, 32, 2
    threads = C.set_threads(args.threads)
    overrides = dict(C.TINY) if args.quick else {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers

    load0 = C.load_average()
    with tempfile.TemporaryDirectory(prefix="bnll_bench_") as work, C.quiet():
        n_params = C.save_random_model(f"{work}/model", **overrides)
        vocab = C.embedded_config().vocab_size
        batch = C.fixed_batch(args.batch_size, args.seq_len, vocab)
        names, times, reference_seconds = run(f"{work}/model", batch, args.rounds, streamed=not args.naive,
                                              work_dir=work)
    load1 = C.load_average()

    nll = times[0]
    rows = []
    for i, (name, t) in enumerate(zip(names, times)):
        ratio = C.median(t) / C.median(nll)
        per_round = [a / b for a, b in zip(t, nll)]
        if i == 0:
            rows.append([name, "1 (reference)", "-", "-"])
            continue
        ok = "yes" if ratio <= TARGET else "**no**"
        rows.append([name, C.fmt(ratio), f"{min(per_round):.3f} - {max(per_round):.3f}", ok])
        if name == ASFT_NAME:  # the frozen model's own cost, apart from the KL's head work
            per_round = [a / b for a, b in zip(reference_seconds, nll)]
            rows.append([REFERENCE_ROW, C.fmt(C.median(reference_seconds) / C.median(nll)),
                         f"{min(per_round):.3f} - {max(per_round):.3f}", "(part of the row above)"])
    table = C.markdown_table(
        ["objective", "step time / NLL (ratio of medians)", "per-round ratio, min - max", f"<= {TARGET}"], rows
    )
    arch = "tiny (--quick)" if args.quick else "SmolLM2-135M architecture from its config"
    if args.layers is not None:
        arch += f", {args.layers} layers"
    conditions = [
        f"model: {arch}, random init, {n_params / 1e6:.1f} M parameters, float32; vocabulary {vocab}",
        f"batch: {args.batch_size} x {args.seq_len} random tokens, the first quarter of each row masked as prompt",
        f"log p: {'naive (full logits)' if args.naive else 'streamed (the module default)'}; AdamW (module default),"
        " gradient clipping 1.0, Lightning fit loop, no logger",
        f"{args.rounds} timed rounds after 1 warm-up round, each round in a fresh random order;"
        f" median NLL step {C.median(nll):.3f} s (context only)",
        "ASFT: its reference is a second float32 copy of the model (no gradients); the row below it is that"
        " model's body forward alone (time / NLL step); the KL's head work on both models is in ASFT's own row",
    ]
    return C.report(
        "Objective overhead: optimizer-step time / NLL", "objective_overhead.py", args, argv, threads, table, conditions,
        load=(load0, load1),
    )


if __name__ == "__main__":
    main()
