"""LoRA / QLoRA with peft: adapters on a frozen base model, exported merged or as an adapter.

Only the adapter weights train; the objectives, the α controller and the streamed log p see
the same model interface (peft injects its layers into the decoder; the output head stays a
plain ``nn.Linear`` unless targeted). peft is imported lazily: it is an optional dependency.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from bnll_lightning.constraints import NonNegativeInt, PositiveFloat, UnitIntervalClosedOpen

__all__ = ["LoraArgs", "apply_lora", "bnb_4bit_config", "export_lora", "is_peft_model", "load_4bit_model"]


@dataclass(frozen=True)
class LoraArgs:
    """LoRA / QLoRA adapters (``model.lora``): rank 0 (the default) fine-tunes every weight.

    Args:
        r: Rank of LoRA adapters (peft); 0 fine-tunes every weight. With LoRA only the
            adapters train, so the optimizer state is a small fraction of the model.
        alpha: LoRA scaling numerator: the adapter update is scaled by alpha / r.
        dropout: Dropout on the adapters' input (regularises small data sets).
        target_modules: Modules that get adapters: ``all-linear`` (every linear layer of
            the decoder, not the output head) or a list of module names (e.g. ``[q_proj, v_proj]``).
        export: What the end of fit writes: ``merged`` (adapters folded into the weights; a
            plain transformers model) or ``adapter`` (peft's adapter directory, loaded on the base).
        load_in_4bit: QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; CUDA only) and train
            LoRA adapters on it (needs r > 0; export with export: adapter).
    """

    r: NonNegativeInt = 0
    alpha: PositiveFloat = 16.0
    dropout: UnitIntervalClosedOpen = 0.0
    target_modules: list[str] | str = "all-linear"
    export: Literal["merged", "adapter"] = "merged"
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"model.lora.r must be >= 0, got {self.r}")
        if self.load_in_4bit and not self.r:
            raise ValueError("model.lora.load_in_4bit (QLoRA) trains adapters on a frozen 4-bit base: "
                             "set model.lora.r > 0")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The QLoRA base: NF4 weights, double quantization, bf16 compute (Dettmers et al., 2023).

    Raises ``RuntimeError`` without a CUDA GPU: bitsandbytes' 4-bit training kernels need one.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "model.lora.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes 4-bit layers train only on GPU. "
            "On CPU use LoRA on a full-precision base (model.lora.r > 0, model.lora.load_in_4bit false)."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_4bit_model(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM with 4-bit NF4 weights on this process's GPU (the QLoRA base)."""
    from transformers import AutoModelForCausalLM

    from bnll_lightning.models import resolve_model_path

    config = bnb_4bit_config()
    # bitsandbytes quantizes while loading onto the device: put each rank's copy on its own GPU.
    device = int(os.environ.get("LOCAL_RANK", 0))
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        quantization_config=config,
        dtype=config.bnb_4bit_compute_dtype,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )
    model.train()
    return model


def apply_lora(model: nn.Module, args: LoraArgs, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with the adapters ``args`` describes; the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as err:  # pragma: no cover - peft is in the dev/lora extras
        raise RuntimeError("LoRA needs peft: pip install 'bnll_lightning[lora]'") from err
    if args.load_in_4bit:
        # Norms and the head in float32, input grads enabled for checkpointing through frozen layers.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def export_lora(model: nn.Module, directory: str, mode: Literal["merged", "adapter"]) -> None:
    """``merged``: a plain transformers model with the adapters folded into the weights (loads with
    ``AutoModelForCausalLM``); ``adapter``: peft's adapter directory (``PeftModel.from_pretrained``
    on the base). The training model is left as it is."""
    os.makedirs(directory, exist_ok=True)
    if mode == "adapter":
        model.save_pretrained(directory)
        return
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise ValueError(
            "model.lora.export=merged cannot fold adapters into a 4-bit base without losing precision: "
            "use lora.export: adapter with lora.load_in_4bit"
        )
    # Merge a CPU copy: the training model keeps its adapters, and the GPU never holds two models.
    device = next(model.parameters()).device
    model.to("cpu")
    try:
        merged = copy.deepcopy(model)
    finally:
        model.to(device)
    merged.merge_and_unload().save_pretrained(directory)
