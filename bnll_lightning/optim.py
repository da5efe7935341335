"""Optimisation in plain torch: weight-decay groups, the default AdamW, the LR schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

__all__ = ["decay_groups", "default_optimizer", "resolve_warmup", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine decay to ``min_ratio`` at ``total_steps``.

    Warm-up starts above zero so the very first optimizer step already moves the weights. Kept instead
    of transformers' ``get_cosine_with_min_lr_schedule_with_warmup``, whose warm-up starts at 0: its
    first optimizer step does nothing, which short runs (and the one-step exactness tests) would feel.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of the total optimizer steps, >= 1 a number of steps."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def decay_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters split into (weight decay, no weight decay): biases and the weights of
    normalisation layers get none, every other weight (embeddings included) does.

    Decided by what a parameter is (its name and its module's type), not by its shape: under FSDP the
    optimizer is built after wrapping, when every parameter is a flat 1-D shard, and a shape rule would
    put every weight in the no-decay group."""
    modules = dict(model.named_modules())
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # each tensor once, tied weights included
        owner, _, leaf = name.rpartition(".")
        norm = "norm" in type(modules[owner]).__name__.lower()  # LayerNorm, RMSNorm, LlamaRMSNorm, GroupNorm, ...
        if p.requires_grad:
            (no_decay if norm or leaf == "bias" else decay).append(p)
    return decay, no_decay


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with fine-tuning defaults (lr 2e-5, betas (0.9, 0.95), weight decay 0.01), fused when
    every parameter is a float tensor on CPU or CUDA."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    # One kernel for the whole update instead of a loop over tensors (TRL's default too; the saving
    # is measured in docs/benchmarks.md, benchmarks/throughput.py).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=fused or None)
