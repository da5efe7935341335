"""FSDP for Hugging Face causal LMs: shard (and optionally checkpoint) each decoder layer.

Lightning's ``FSDPStrategy`` needs an ``auto_wrap_policy`` naming the transformer block class,
which depends on the model (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) and cannot be
written as a set of classes in YAML. :class:`HFFSDPStrategy` finds it at setup time from the
model's ``_no_split_modules`` (the classes transformers itself never splits across devices)::

    trainer:
      strategy:
        class_path: bnll_lightning.strategies.HFFSDPStrategy
        init_args: {state_dict_type: sharded}
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["HFFSDPStrategy", "decoder_layer_classes"]


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s submodules named in a Hugging Face ``_no_split_modules``.

    Works on a bare ``PreTrainedModel``, a peft wrapper or a LightningModule holding one.
    Raises ``ValueError`` when no submodule declares ``_no_split_modules`` or none matches.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules: pass auto_wrap_policy explicitly "
            "(e.g. {'class_path': ..., 'init_args': ...}) to HFFSDPStrategy"
        )
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"no submodule of {type(model).__name__} is one of _no_split_modules={sorted(names)}")
    return classes


class HFFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose wrap (and activation-checkpointing) policy is the model's decoder layer.

    Every argument of Lightning's ``FSDPStrategy`` is accepted (``sharding_strategy``,
    ``state_dict_type``, ``cpu_offload``, ``mixed_precision``, ...); an explicit
    ``auto_wrap_policy`` wins over the automatic one.
    """

    strategy_name = "hf_fsdp"

    def __init__(
        self,
        *args: Any,
        checkpoint_decoder_layers: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            checkpoint_decoder_layers: Recompute each decoder layer in backward (FSDP-aware
                activation checkpointing; use it instead of ``model.gradient_checkpointing``).
            sharding_strategy: ``FULL_SHARD`` (ZeRO-3: parameters, gradients and optimizer state
                sharded), ``SHARD_GRAD_OP`` (ZeRO-2), ``NO_SHARD`` (DDP), ``HYBRID_SHARD``
                (full shard within a node, replicate across nodes).
            state_dict_type: ``sharded``: each rank writes its shard (checkpoint = directory; fast,
                no rank holds the full model); ``full``: gathered into one file on rank 0.
        """
        super().__init__(*args, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
        self.checkpoint_decoder_layers = checkpoint_decoder_layers

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if any(hasattr(m, "peft_config") for m in model.modules()):
            # The merged/adapter export and frozen-base sharding are not wired for FSDP: fail before training.
            raise ValueError(
                "LoRA/QLoRA (model.lora_r > 0) is not supported with HFFSDPStrategy: use DDP (configs/ddp.yaml)"
            )
        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already_wrapped and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(decoder_layer_classes(model))
        if self.checkpoint_decoder_layers and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(decoder_layer_classes(model))}
        return super()._setup_model(model)


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards the weights (FSDP, FSDP2 through ModelParallelStrategy, DeepSpeed):
    then no code may run the model outside the wrapped forward."""
    name = type(strategy).__name__
    return isinstance(strategy, FSDPStrategy) or any(k in name for k in ("FSDP", "ModelParallel", "DeepSpeed"))
