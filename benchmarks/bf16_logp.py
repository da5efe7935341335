"""How much a bf16 output head perturbs log p and the gradient weight W_f(p) = p^α(1 − p).

Under ``bf16-mixed`` the decoder runs in bf16 and, by default, so does the head's matmul: each logit
then carries a rounding of about |z|·2⁻⁸, which log p inherits and p^α multiplies by α. This script
runs the embedded model under bf16 autocast on real task rows, takes the final hidden states of the
target positions once, and computes log p from them twice: with the head matmul in bf16 (what the
streamed path does under autocast) and in float32 (the reference). It reports the error of log p and
of W_f at α = 0, 1, 10, relative to the size of W_f. The decoder's own bf16 rounding is the same on
both sides, so only the head's share is measured.

    python benchmarks/bf16_logp.py --append      # embedded SmolLM2-135M-Instruct, a minute on 2 CPU cores
    python benchmarks/bf16_logp.py --quick       # tiny random model: checks the harness
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import _common as C
from bnll_lightning.data import SFTDataModule
from bnll_lightning.models import load_model, load_tokenizer
from bnll_lightning.logp_head import target_labels
from bnll_lightning.objectives import IGNORE_INDEX
from bnll_lightning.streaming import forward_hidden, output_head

ALPHAS = (0.0, 1.0, 10.0)


def target_hidden(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 final hidden states of every target position, and the targets."""
    hs, ts = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in batches:
            labels = target_labels(batch)
            mask = labels != IGNORE_INDEX
            hidden = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
            hs.append(hidden[mask].to(torch.bfloat16))
            ts.append(labels[mask])
    return torch.cat(hs), torch.cat(ts)


def logp_with_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 log p of ``targets`` with the head matmul in ``dtype`` (then float32 softmax)."""
    logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)


def weight_of(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """W_f(p) = p^α (1 − p) = exp(α log p) · (−expm1(log p))."""
    return torch.exp(alpha * logp) * -torch.expm1(logp)


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["sort", "add", "capital", "successor", "reverse3"])
    parser.add_argument("--rows", type=int, default=64, help="rows per task")
    args = parser.parse_args(argv)
    threads = C.set_threads(args.threads)
    if args.quick:
        args.tasks, args.rows = ["add"], 4
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work, C.quiet():

        name = C.make_tiny_model(f"{work}/tiny", hidden_size=32, num_layers=2, num_heads=2) if args.quick else "embedded"
        model, tokenizer = load_model(name).eval(), load_tokenizer(name)
        batches = []
        for task in args.tasks:
            data = SFTDataModule(train=f"builtin:{task}", num_train=args.rows, num_val=0, batch_size=8,
                                 tokenizer=tokenizer)  # fmt: skip
            data.setup("fit")
            batches += [data.collate([data.train_dataset[i] for i in range(j, min(j + 8, len(data.train_dataset)))])
                        for j in range(0, len(data.train_dataset), 8)]  # fmt: skip
        hidden, targets = target_hidden(model, batches)
        weight, _ = output_head(model)
        weight = weight.detach().float()
        ref = logp_with_head(hidden, weight, targets, torch.float32)
        low = logp_with_head(hidden, weight, targets, torch.bfloat16)
    lines = [["log p", f"{(low - ref).abs().mean():.2e}", f"{(low - ref).abs().max():.2e}", "–", "–"]]
    for alpha in ALPHAS:
        w_ref, w_low = weight_of(ref, alpha), weight_of(low, alpha)
        err = (w_low - w_ref).abs()
        lines.append([f"W_f, α = {alpha:g}", f"{err.mean():.2e}", f"{err.max():.2e}", f"{w_ref.mean():.3e}",
                      f"{err.sum() / w_ref.sum().clamp_min(1e-30):.2%}"])  # fmt: skip
    table = C.markdown_table(["quantity", "mean abs(bf16 − fp32)", "max abs(bf16 − fp32)", "mean fp32 value",
                              "error / value (summed over tokens)"], lines)  # fmt: skip
    p = ref.exp()
    conditions = [
        f"model: {'tiny random Llama' if args.quick else 'embedded SmolLM2-135M-Instruct'}, decoder under bf16"
        " autocast; head weight float32, its matmul in bf16 (the streamed path's default under bf16-mixed) vs float32",
        f"tokens: {targets.numel()} target tokens of {args.rows} rows of each of {', '.join(args.tasks)} (chat"
        f" template); their p: mean {p.mean():.3f}, median {p.median():.3f}",
        f"wall time {time.perf_counter() - start:.0f} s (not a timing)",
    ]
    return C.report("bf16 output head: error of log p and of the gradient weight W_f", "bf16_logp.py", args, argv,
                    threads, table, conditions)  # fmt: skip


if __name__ == "__main__":
    main()
