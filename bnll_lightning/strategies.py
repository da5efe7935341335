"""Sharding strategies for Hugging Face causal LMs: each decoder layer is one shard unit.

Lightning's ``FSDPStrategy`` needs an ``auto_wrap_policy`` naming the transformer block class,
which depends on the model (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) and cannot be
written as a set of classes in YAML. :class:`HFFSDPStrategy` (FSDP1) finds it at setup time from
the model's ``_no_split_modules`` (the classes transformers itself never splits across devices);
:class:`FSDP2Strategy` does the same with FSDP2's ``fully_shard`` through Lightning's
``ModelParallelStrategy``, which keeps parameter shapes and runs on CPU (gloo) as well as CUDA::

    trainer:
      strategy:
        class_path: bnll_lightning.strategies.FSDP2Strategy
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

__all__ = ["FSDP2Strategy", "HFFSDPStrategy", "decoder_layer_classes", "is_sharded"]


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
                activation checkpointing; use it instead of ``model.loading.gradient_checkpointing``).
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
                "LoRA/QLoRA (model.lora.r > 0) is not supported with HFFSDPStrategy: use DDP (configs/ddp.yaml)"
            )
        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already_wrapped and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(decoder_layer_classes(model))
        if self.checkpoint_decoder_layers and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(decoder_layer_classes(model))}
        return super()._setup_model(model)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over every process: each decoder layer is a shard unit, the rest of
    the model (embeddings, final norm, output head) is the root unit.

    Lightning's ``ModelParallelStrategy`` with data parallelism over all processes and no tensor
    parallelism. The model's steps run *inside* the root's forward, so the root's parameters are
    whole there: the streamed head reads the output weight directly, outside any ``forward`` of
    its own. Checkpoints are sharded directories (one file per rank) unless
    ``save_distributed_checkpoint`` is false; the export at the end of fit gathers the full weights.
    """

    def __init__(self, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None) -> None:
        """
        Args:
            reshard_after_forward: Free each layer's gathered weights after its forward and gather
                them again for backward (ZeRO-3, least memory); false keeps them until backward
                (ZeRO-2: one all-gather less per layer, more memory).
            save_distributed_checkpoint: Each rank writes its shard (a checkpoint directory, fast,
                never gathered); false gathers weights and optimizer state into one file on rank 0.
            process_group_backend: ``nccl`` / ``gloo``; None: nccl on CUDA, gloo on CPU.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every process is a data-parallel rank holding a shard ("auto" would mean one rank per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """``fully_shard`` each decoder layer, then ``model`` itself (idempotent)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):
            return
        if any(hasattr(m, "peft_config") for m in model.modules()):
            raise ValueError("LoRA/QLoRA (model.lora.r > 0) is not supported with FSDP2Strategy: use DDP")
        mesh = self.device_mesh["data_parallel"]
        layers = tuple(decoder_layer_classes(model))
        for module in model.modules():
            if isinstance(module, layers):
                fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)

    def _inside_root_forward(self, step: str, *args: Any, **kwargs: Any) -> Any:
        # FSDP2 gathers a unit's parameters in forward hooks: calling the root model with its forward
        # swapped for the step makes the root's (embeddings, head) whole during the step and
        # registers the backward hooks that reduce-scatter their gradients. Lightning's own
        # redirection assumes the LightningModule is the wrapped root; here the HF model is.
        module = self.lightning_module
        root = module.model
        original = root.forward

        def forward(*a: Any, **k: Any) -> Any:
            root.forward = original
            return getattr(module, step)(*a, **k)

        root.forward = forward
        try:
            return root(*args, **kwargs)
        finally:
            root.forward = original

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._inside_root_forward("training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._inside_root_forward("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._inside_root_forward("test_step", *args, **kwargs)


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards the weights (FSDP, FSDP2 through ModelParallelStrategy, DeepSpeed):
    then no code may run the model outside the wrapped forward."""
    name = type(strategy).__name__
    return isinstance(strategy, FSDPStrategy) or any(k in name for k in ("FSDP", "ModelParallel", "DeepSpeed"))
