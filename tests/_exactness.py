"""Shared by tests/test_distributed.py and the DDP worker it launches with torchrun.

One optimizer step of plain SGD with lr = 1 moves the weights by exactly the gradient, so
``theta_0 - theta_1`` is the gradient the module produced after its token-exact rescale in
``on_before_optimizer_step``. The reference is the gradient of one batch holding every row of
the step.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch

from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule


def sgd_lr1(params):
    return torch.optim.SGD(params, lr=1.0)


class TargetCounts(L.Callback):
    """Target tokens of each micro-batch this rank trained on (labels are shifted by one in the module)."""

    def __init__(self):
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts.append(int((batch["labels"][:, 1:] != -100).sum()))


def build(model_dir: str, objective=None, alpha_controller=None, num_rows: int = 12, batch_size: int = 2,
          export_dir: str | None = None) -> tuple[SFTModule, SFTDataModule]:
    module = SFTModule(model=model_dir, objective=objective, alpha_controller=alpha_controller,
                       optimizer=sgd_lr1, warmup=0, export_dir=export_dir)
    data = SFTDataModule(train="builtin:sort", num_train=num_rows, num_val=0, batch_size=batch_size,
                         tokenizer=module.tokenizer)
    return module, data


def one_step_trainer(accumulate: int, callbacks=(), **kwargs) -> L.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     callbacks=list(callbacks), **kwargs)


def reference(model_dir: str, objective, rows_batch: dict) -> tuple[dict[str, torch.Tensor], float, float]:
    """Gradient of one batch holding every row, its loss, and its token-weighted mean p."""
    module = SFTModule(model=model_dir, objective=objective)
    logp, mask = module.target_logprobs(rows_batch)
    out = objective.from_logprobs(logp, mask)
    out.loss.backward()
    logp = logp.detach()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters()}
    return grads, out.loss.item(), logp[mask].exp().mean().item()


def step_of(module_before: dict[str, torch.Tensor], module_after) -> dict[str, torch.Tensor]:
    """theta_0 - theta_1: the gradient of an SGD step with lr = 1."""
    after = dict(module_after.named_parameters())
    return {n: module_before[n] - after[n].detach() for n in module_before}
