"""Training throughput of ``fit`` / TRL ``SFTTrainer``: same model, data, batch, length, precision, machine.

Our side is the default path: ``SFTModule`` + ``SFTDataModule`` in a Lightning ``Trainer`` (streamed
log p, the module's default optimizer, the data module's collation). The peer is TRL's
``SFTTrainer`` (``pip install trl``, the ``bench`` extra) on the *same tokenized rows* (input ids
and prompt-masked labels from ``SFTDataModule``), ``loss_type="nll"`` against our NLL and
``loss_type="dft"`` against our DFT and NegProb (-p). Settings where the two differ by default are
set equal: float32 on both (TRL defaults to bf16), no gradient checkpointing (TRL defaults to it),
fused AdamW on TRL (its default) against the module's default optimizer, gradient clipping 1.0,
batch and length, no logger / ``report_to="none"``, no checkpoints, no evaluation, the same torch
thread count. Every row of the data is longer than ``--seq-len`` and cut there, so no batch has
padding and both sides process exactly ``batch x seq_len`` tokens per step.

Each run is a fresh Python process (``--in-process`` for quick checks); the first ``--warmup``
optimizer steps are not timed; tokens/s = tokens of the timed steps / wall time from the end of
the last warm-up step to the end of the last step (data loading included). Runs alternate ours /
TRL, ``--repeats`` times, the order reversed every other repeat; the ratio is reported per repeat.
Without TRL installed only our side runs and the ratio reads n/a (the peer is an optional extra).

``--packing`` measures packing instead, on rows of uneven, long-tailed lengths (log-normal, median 160
tokens, clipped to 32 .. ``--seq-len``, default 1024): one epoch over the same tokenized rows with
``data.packing`` off (``--batch-size`` rows per step, padded to the longest) and on (``--pack-batch-size``
packed sequences per step, about as many real tokens), and TRL's ``packing=False`` / ``packing=True``
(best-fit decreasing, padding-free) on the same rows, its loss on the same target tokens
(``completion_mask``). tokens/s counts real (non-padding) tokens only.

    python benchmarks/throughput.py [--quick] [--append] [--packing]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C

TARGET = 1.0  # our tokens/s at least the peer's
# (row label, our objective class, TRL loss_type)
PAIRS = [("NLL", "NLL", "nll"), ("DFT", "DFT", "dft"), ("NegProb (-p) vs TRL dft", "NegProb", "dft")]
# TRL gets the hyper-parameters of SFTModule's default AdamW (they do not change the speed).
LR, BETAS, WEIGHT_DECAY, CLIP = 2e-5, (0.9, 0.95), 0.01, 1.0


def write_rows(path: str, n: int, seq_len: int) -> None:
    """``n`` synthetic prompt/response rows whose responses are far longer than ``seq_len`` tokens."""
    with open(path, "w") as f:
        for i in range(n):
            start = 17 * i + 3
            response = " ".join(str(start + k) for k in range(seq_len))
            f.write(json.dumps({"prompt": f"Count upward from {start}.", "response": response}) + "\n")


def write_uneven_rows(path: str, n: int, max_len: int, seed: int = 0) -> None:
    """``n`` rows of long-tailed length: log-normal around 160 tokens, clipped to [32, ``max_len``]
    (about 40 of them template and prompt)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green"]
    with open(path, "w") as f:
        for i in range(n):
            length = min(max_len, max(32, round(rng.lognormvariate(math.log(160), 0.8))))
            response = " ".join(rng.choice(words) for _ in range(max(1, length - 40)))
            f.write(json.dumps({"prompt": f"Write row {i}.", "response": response}) + "\n")


def tokenized_rows(model: str, data_path: str, seq_len: int) -> list[dict[str, list[int]]]:
    """The rows as SFTDataModule tokenizes them (chat template, prompt masked, cut at ``seq_len``)."""
    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.models import load_tokenizer

    dm = SFTDataModule(train=data_path, val_fraction=0.0, max_length=seq_len, tokenizer=load_tokenizer(model))
    dm.setup()
    return [dict(f) for f in dm.train_dataset.features]


# --------------------------------------------------------------------------- the two sides


def prepare(work: str, args, write) -> tuple[str, str, str, list[dict[str, list[int]]]]:
    """(model, rows .jsonl, path for TRL's rows .json, our tokenized rows): ``--model`` or, with ``--quick``,
    a tiny random one, and the rows ``write(path)`` writes, tokenized as our data module does."""
    model = args.model
    with C.quiet():
        if args.quick:
            model = f"{work}/model"
            C.save_random_model(model, **C.TINY)
        data_path = f"{work}/rows.jsonl"
        write(data_path)
        rows = tokenized_rows(model, data_path, args.seq_len)
    return model, data_path, f"{work}/rows.json", rows


def run_ours(model: str, data_path: str, objective: str, batch_size: int, seq_len: int, steps: int,
             warmup: int, work: str, packing: bool = False) -> dict:
    """``steps`` <= 0: one epoch."""
    import lightning.pytorch as L

    from bnll_lightning import objectives
    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.module import SFTModule

    marks: list[tuple[float, int]] = []  # (time at the end of each step, its tokens)
    threads: list[int] = []

    positions: list[int] = []

    class StepTimer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marks.append((time.perf_counter(), int(batch["attention_mask"].sum())))
            positions.append(batch["input_ids"].numel())
            threads.append(torch.get_num_threads())

    module = SFTModule(
        model=model, objective=getattr(objectives, objective)(), export_dir=f"{work}/export"
    )
    data = SFTDataModule(train=data_path, val_fraction=0.0, max_length=seq_len, batch_size=batch_size,
                         packing=packing, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=warmup + steps if steps > 0 else -1,
        max_epochs=1 if steps <= 0 else None, gradient_clip_val=CLIP,
        logger=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[StepTimer()], default_root_dir=work,
    )
    trainer.fit(module, data)
    return {**_rate(marks, warmup, threads), "padding": 1 - sum(n for _, n in marks) / sum(positions)}


def run_trl(model: str, rows: list[dict], loss_type: str, batch_size: int, seq_len: int, steps: int,
            warmup: int, work: str, packing: bool = False) -> dict:
    """``steps`` <= 0: one epoch."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bnll_lightning.models import load_model, load_tokenizer

    marks: list[tuple[float, int]] = []
    threads: list[int] = []
    sizes: list[tuple[int, int]] = []  # (real tokens, positions) of each batch, in order

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), sizes[len(marks)][0]))
            threads.append(torch.get_num_threads())

    config = SFTConfig(
        output_dir=f"{work}/trl", per_device_train_batch_size=batch_size, max_steps=warmup + steps if steps > 0 else -1,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
        bf16=False, fp16=False, gradient_checkpointing=False, optim="adamw_torch_fused", loss_type=loss_type,
        max_length=seq_len, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, seed=0, packing=packing, num_train_epochs=1,
    )
    trainer = SFTTrainer(
        model=load_model(model), args=config, processing_class=load_tokenizer(model),
        train_dataset=Dataset.from_list(rows), callbacks=[StepTimer()],
    )
    collate = trainer.data_collator

    def counting_collator(features):  # real tokens: padding-free batches have no padding to mask
        batch = collate(features)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        sizes.append((int(real), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return {**_rate(marks, warmup, threads), "padding": 1 - sum(n for n, _ in sizes) / sum(p for _, p in sizes)}


def _rate(marks: list[tuple[float, int]], warmup: int, threads: list[int]) -> dict:
    if len(marks) <= warmup + 1:
        raise RuntimeError(f"only {len(marks)} steps ran; need more than warmup + 1 = {warmup + 1}")
    seconds = marks[-1][0] - marks[warmup - 1][0] if warmup else marks[-1][0] - marks[0][0]
    first = warmup if warmup else 1
    tokens = sum(n for _, n in marks[first:])
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "steps": len(marks) - first,
            "threads": sorted(set(threads))}


def run_one(spec: dict) -> dict:
    common = {k: spec[k] for k in ("model", "batch_size", "seq_len", "steps", "warmup", "work")}
    common["packing"] = spec.get("packing", False)
    with C.quiet():
        if spec["side"] == "ours":
            return run_ours(data_path=spec["data_path"], objective=spec["objective"], **common)
        with open(spec["rows_path"]) as f:
            rows = json.load(f)
        return run_trl(rows=rows, loss_type=spec["loss_type"], **common)


def run_isolated(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec['side']} {spec.get('objective') or spec.get('loss_type')} failed:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_version() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return None
    from importlib.metadata import version

    return version("trl")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--model", default="embedded", help="model for both sides (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, help="row length (default 256); --packing: max_length (default 1024)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 2; --packing: 1)")
    parser.add_argument("--repeats", type=int, help="runs of each configuration (default 2; --packing: 1)")
    parser.add_argument("--packing", action="store_true", help="measure data.packing on uneven rows (see above)")
    parser.add_argument("--rows", type=int, default=32, help="--packing: rows of the epoch each run trains on")
    parser.add_argument("--pack-batch-size", type=int, default=1, help="--packing: packed sequences per step")
    parser.add_argument("--objectives", default=",".join(o for _, o, _ in PAIRS),
                        help="comma-separated subset of our objectives to compare")
    parser.add_argument("--no-peer", action="store_true", help="run our side only, even with TRL installed")
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = C.set_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return ""
    if args.packing:
        return packing_main(args, argv, threads)
    args.seq_len, args.repeats = args.seq_len or 256, args.repeats or 2
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.quick:
        args.batch_size, args.seq_len, args.steps, args.warmup, args.repeats = 2, 64, 3, 1, 1
        args.in_process = True
    peer = None if args.no_peer else trl_version()

    load0 = C.load_average()
    with tempfile.TemporaryDirectory(prefix="bnll_tput_") as work:
        model, data_path, rows_path, rows = prepare(
            work, args, lambda path: write_rows(path, (args.warmup + args.steps) * args.batch_size, args.seq_len))
        lengths = {len(r["input_ids"]) for r in rows}
        if lengths != {args.seq_len}:
            raise RuntimeError(f"rows are not all {args.seq_len} tokens long: {sorted(lengths)}")
        targets = sum(sum(lbl != -100 for lbl in r["labels"]) for r in rows) / sum(len(r["labels"]) for r in rows)
        with open(rows_path, "w") as f:
            json.dump(rows, f)

        pairs = [p for p in PAIRS if p[1] in args.objectives.split(",")]
        if not pairs:
            parser.error(f"--objectives: choose from {[o for _, o, _ in PAIRS]}")
        configs = []  # (pair, side)
        for i, pair in enumerate(pairs):
            configs.append((pair, "ours"))
            if peer and pair[2] not in [p[2] for p in pairs[:i]]:
                configs.append((pair, "trl"))
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.repeats):
            for (label, objective, loss_type), side in configs if r % 2 == 0 else configs[::-1]:
                spec = {"side": side, "model": model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                        "steps": args.steps, "warmup": args.warmup, "work": f"{work}/run{r}_{side}_{objective}",
                        "data_path": data_path, "rows_path": rows_path, "objective": objective, "loss_type": loss_type}
                key = (side, objective if side == "ours" else loss_type)
                out = run_one(spec) if args.in_process else run_isolated(spec, threads)
                print(f"[throughput] repeat {r}: {key[0]} {key[1]}: {out['tokens_per_s']:.1f} tokens/s",
                      file=sys.stderr)
                results.setdefault(key, []).append(out)
    load1 = C.load_average()

    rows_out = []
    for label, objective, loss_type in pairs:
        ours = [o["tokens_per_s"] for o in results[("ours", objective)]]
        theirs = [o["tokens_per_s"] for o in results.get(("trl", loss_type), [])]
        if theirs:
            ratios = [a / b for a, b in zip(ours, theirs)]
            ratio, spread = C.median(ratios), ", ".join(f"{x:.3f}" for x in ratios)
            ok = "yes" if ratio >= TARGET else "**no**"
            peer_col = ", ".join(f"{x:.0f}" for x in theirs)
        else:
            ratio, spread, ok = float("nan"), "-", "-"
            peer_col = "n/a (TRL not installed: pip install trl)" if not args.no_peer else "n/a (--no-peer)"
        rows_out.append([f"{label} (TRL loss_type={loss_type})", C.fmt(ratio), spread, ok,
                         ", ".join(f"{x:.0f}" for x in ours), peer_col])
    table = C.markdown_table(
        ["objective", "ours / TRL tokens/s (median)", "per repeat", f">= {TARGET}", "ours tokens/s", "TRL tokens/s"],
        rows_out,
    )
    all_threads = sorted({t for outs in results.values() for o in outs for t in o["threads"]})
    conditions = [
        f"model: {'tiny random (--quick)' if args.quick else args.model}, float32 on both sides, no gradient"
        " checkpointing; our side streamed log p (module default)",
        f"data: synthetic rows cut at {args.seq_len} tokens, no padding; {targets:.0%} of tokens are targets;"
        f" batch {args.batch_size} x {args.seq_len}, {args.warmup} warm-up + {args.steps} timed steps per run,"
        f" {args.repeats} repeat(s), ours/TRL alternating",
        f"peer: {'TRL ' + peer + ' SFTTrainer, fused AdamW (its default)' if peer else 'TRL not run'};"
        f" torch threads seen during the steps: {all_threads}; runs "
        + ("in this process (--quick/--in-process)" if args.in_process else "each in a fresh process"),
        "tokens/s columns are context for the ratio only: the machine was shared",
    ]
    return C.report(
        "Throughput: fit / TRL SFTTrainer", "throughput.py", args, argv, threads, table, conditions,
        load=(load0, load1),
    )


def packing_main(args: argparse.Namespace, argv: list[str], threads: int) -> str:
    """tokens/s without and with packing, ours and TRL's, one epoch over the same uneven rows per run."""
    args.seq_len, args.repeats = args.seq_len or 1024, args.repeats or 1
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.quick:
        args.rows, args.seq_len, args.batch_size, args.repeats, args.in_process = 12, 256, 2, 1, True
    peer = None if args.no_peer else trl_version()
    load0 = C.load_average()
    with tempfile.TemporaryDirectory(prefix="bnll_pack_") as work:
        model, data_path, rows_path, rows = prepare(
            work, args, lambda path: write_uneven_rows(path, args.rows, args.seq_len))
        lengths = sorted(len(r["input_ids"]) for r in rows)
        with open(rows_path, "w") as f:  # TRL trains on the same target tokens: completion_mask = our labels
            json.dump([{"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]]}
                       for r in rows], f)
        configs = [(side, packing) for side in ("ours", "trl")[: 2 if peer else 1] for packing in (False, True)]
        results: dict[tuple[str, bool], list[dict]] = {}
        for r in range(args.repeats):
            for side, packing in configs if r % 2 == 0 else configs[::-1]:
                spec = {"side": side, "model": model, "seq_len": args.seq_len, "steps": 0, "warmup": args.warmup,
                        "batch_size": args.pack_batch_size if packing else args.batch_size, "packing": packing,
                        "work": f"{work}/run{r}_{side}_{packing}", "data_path": data_path, "rows_path": rows_path,
                        "objective": "NLL", "loss_type": "nll"}
                out = run_one(spec) if args.in_process else run_isolated(spec, threads)
                print(f"[throughput] repeat {r}: {side} packing={packing}: {out['tokens_per_s']:.1f} tokens/s",
                      file=sys.stderr)
                results.setdefault((side, packing), []).append(out)
    load1 = C.load_average()

    table_rows = []
    for side, packing in configs:
        rates = [o["tokens_per_s"] for o in results[(side, packing)]]
        base = [o["tokens_per_s"] for o in results[(side, False)]]
        name = ("ours, data.packing: " if side == "ours" else f"TRL {peer} SFTTrainer, packing=") + str(packing).lower()
        table_rows.append([name, f"{C.median(rates):.0f}", ", ".join(f"{x:.0f}" for x in rates),
                           C.fmt(C.median([a / b for a, b in zip(rates, base)]), 2),
                           f"{C.median([o['padding'] for o in results[(side, packing)]]):.0%}",
                           results[(side, packing)][0]["steps"]])
    if peer:
        ours, theirs = ([o["tokens_per_s"] for o in results[(s, True)]] for s in ("ours", "trl"))
        table_rows.append(["ours / TRL, both packed", C.fmt(C.median([a / b for a, b in zip(ours, theirs)]), 2),
                           "", "", "", ""])
    table = C.markdown_table(["run", "real tokens/s (median)", "per repeat", "/ same side unpacked",
                              "padding share of positions", "timed steps"], table_rows)
    conditions = [
        f"model: {'tiny random (--quick)' if args.quick else args.model}, float32, NLL, no gradient checkpointing;"
        " ours streamed log p (module default)",
        f"data: {len(rows)} rows, tokens per row min {lengths[0]} / median {lengths[len(lengths) // 2]} / mean"
        f" {sum(lengths) / len(lengths):.0f} / max {lengths[-1]} ({sum(lengths)} in all; log-normal, clipped to"
        f" 32 .. {args.seq_len}); max_length {args.seq_len}; one epoch per run, the first {args.warmup} step(s)"
        f" untimed; unpacked: {args.batch_size} rows per step, packed: {args.pack_batch_size} sequence(s) of"
        f" <= {args.seq_len} tokens per step",
        f"peer: {'TRL ' + peer + ' (packing=True: best-fit decreasing, padding-free)' if peer else 'TRL not run'};"
        f" {args.repeats} repeat(s), runs " + ("in this process" if args.in_process else "each in a fresh process"),
        "timed on a shared, loaded machine: absolute tokens/s are indicative only; compare ratios within this run",
    ]
    return C.report("Throughput with packing: uneven rows, ours / TRL", "throughput.py", args, argv, threads,
                    table, conditions, load=(load0, load1))


if __name__ == "__main__":
    main()
