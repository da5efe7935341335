"""What the benchmark scripts (and the tests) share: the machine line, markdown tables, docs/benchmarks.md,
and randomly initialised models built from the embedded SmolLM2-135M config or a tiny Llama (no download)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import logging
import math
import os
import platform
import shlex
import statistics
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"

# SmolLM2-135M's architecture shrunk to a toy: the --quick sizes (vocabulary stays 49 152).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (seconds): checks the harness, not the timings")
    parser.add_argument("--append", action="store_true", help="append the result to --docs")
    parser.add_argument("--docs", default=str(DOCS), help="markdown file --append writes to")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (and OpenMP's, for subprocesses); return the count in force."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    """1-minute load average (the machine is shared: this says how busy it was)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def machine_line(threads: int) -> str:
    return (
        f"{platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{threads} torch threads"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the first markdown table in ``text`` (for tests and re-reading)."""
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), itertools.dropwhile(
        lambda line: not line.startswith("|"), (line.strip() for line in text.splitlines()))))
    if len(lines) < 2:
        raise ValueError("no markdown table in text")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def section(
    title: str, script: str, argv: Sequence[str], threads: int, table: str,
    conditions: Sequence[str], notes: Sequence[str] = (), load: tuple[float, float] | None = None,
    quick: bool = False,
) -> str:
    """The markdown block --append writes: title, date, exact command, machine, conditions, table, notes."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if quick:
        title += " (--quick: harness check, not a measurement)"
    command = shlex.join(["python", f"benchmarks/{script}", *argv])
    out = [f"### {title} ({now})", "", f"- command: `{command}`", f"- machine: {machine_line(threads)}"]
    if load is not None:
        out.append(f"- 1-min load average: {load[0]:.2f} at start, {load[1]:.2f} at end (2 cores shared with others)")
    out += [f"- {c}" for c in conditions]
    out += ["", table, ""]
    out += [f"{n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def report(
    title: str, script: str, args: argparse.Namespace, argv: Sequence[str], threads: int, table: str,
    conditions: Sequence[str], notes: Sequence[str] = (), load: tuple[float, float] | None = None,
) -> str:
    """The end of every script's ``main``: build the section, print it, append it with --append."""
    text = section(title, script, argv, threads, table, conditions, notes, load, quick=args.quick)
    print(text)
    if args.append:
        append(text, args.docs)
    return text


def append(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + text)


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def embedded_config(**overrides):
    """The embedded SmolLM2-135M-Instruct config (local, no download) with ``overrides`` applied."""
    from transformers import AutoConfig

    from bnll_lightning.models import EMBEDDED, resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(EMBEDDED))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_random_model(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> int:
    """Save a randomly initialised float32 model of the embedded config (+ ``overrides``) and the
    embedded tokenizer to ``out_dir`` (``SFTModule(model=out_dir)`` loads it). Returns its parameter count."""
    from transformers import AutoModelForCausalLM

    from bnll_lightning.models import EMBEDDED, load_tokenizer

    config = embedded_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    load_tokenizer(EMBEDDED).save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def make_tiny_model(
    out_dir,
    tokenizer: str = "embedded",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 1024,
) -> str:
    """Save a tiny randomly initialised Llama model plus ``tokenizer``'s tokenizer to ``out_dir``.

    The vocabulary and bos/eos/pad ids come from the tokenizer; weights depend only on
    ``seed`` (the global RNG state is left untouched). Returns ``out_dir`` as a string.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from bnll_lightning.models import load_tokenizer

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    tok = load_tokenizer(tokenizer)
    tok.model_max_length = min(tok.model_max_length, max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir = str(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def fixed_batch(batch_size: int, seq_len: int, vocab: int, prompt_fraction: float = 0.25, seed: int = 0):
    """Random tokens; the first ``prompt_fraction`` of every row is masked (-100) like a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(seq_len * prompt_fraction)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def fit_on_batch(model_dir: str, batch: dict, steps: int, work_dir: str, callbacks: list, profiler=None,
                 **module_kwargs) -> None:
    """``steps`` optimizer steps of an ``SFTModule`` on one fixed batch in Lightning's fit loop, with
    nothing else in the loop: no logger, checkpoints, progress bar, validation or histograms."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from bnll_lightning.module import SFTModule

    module = SFTModule(model=model_dir, histogram_every_n_steps=0, export_dir=f"{work_dir}/export", **module_kwargs)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=work_dir,
        profiler=profiler,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's and transformers' INFO chatter and warnings while a benchmark runs."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers' levels: import first, then lower them)
    import transformers

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "transformers")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
