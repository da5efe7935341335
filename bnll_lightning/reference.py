"""A frozen reference model for objectives anchored to it (``objectives.ASFT``).

The reference is loaded once, frozen (``requires_grad=False``, eval mode so no dropout) and held
by the objective as a plain Python object, not as an ``nn.Module`` attribute: its weights are not
in the trained module's ``parameters()`` (so not in the optimizer, DDP's gradient buckets or the
gradient rescaling), not in its ``state_dict()`` (so not in Lightning checkpoints) and not in
the exported model. It follows the trained model's device on first use.

On the streamed path it contributes its final hidden states at the target positions and its
output head; ``streaming.streamed_token_stats`` turns them into the KL chunk by chunk, beside the
trained model's log p, without either model's ``[B, T, V]`` logits.
"""

from __future__ import annotations

import os
from typing import Any
import torch
from torch import Tensor, nn

from bnll_lightning.streaming import StreamingHead, forward_hidden, streaming_head, streaming_unsupported_reason

__all__ = ["FrozenReference", "load_8bit_model"]


def load_8bit_model(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM with int8 weights (bitsandbytes LLM.int8) on this process's GPU. The output head
    is left unquantised by transformers, so the reference can still be streamed."""
    if not torch.cuda.is_available():
        raise RuntimeError("ASFT.reference_load_in_8bit needs a CUDA GPU (bitsandbytes int8); on CPU use "
                           "reference_dtype: bfloat16 to halve the reference's memory instead")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from bnll_lightning.models import resolve_model_path

    device = int(os.environ.get("LOCAL_RANK", 0))  # each rank's copy on its own GPU
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )


class FrozenReference:
    """A frozen causal LM: hidden states and head for streamed objectives, or full logits.

    Args:
        model: Hub id, local directory or ``embedded``; or an already loaded ``nn.Module`` (it is
            frozen in place: pass a copy if the same weights are also trained).
        dtype: Weights' dtype when loading by name (``float32`` when None, ``bfloat16``, ...).
        load_in_8bit: int8 weights via bitsandbytes (CUDA).
        trust_remote_code: Allow the hub repository's model code to run.
    """

    def __init__(
        self,
        model: str | nn.Module,
        dtype: str | torch.dtype | None = None,
        load_in_8bit: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        from bnll_lightning.models import load_model

        if isinstance(model, nn.Module):
            self.name, self.model = type(model).__name__, model
        elif load_in_8bit:
            self.name, self.model = str(model), load_8bit_model(model, trust_remote_code=trust_remote_code)
        else:
            self.name, self.model = str(model), load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
        self.quantized = bool(getattr(self.model, "is_quantized", False) or load_in_8bit)
        self.model.requires_grad_(False)
        self.model.eval()
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        self._stream_checked = False

    def __repr__(self) -> str:
        return f"FrozenReference({self.name!r}, dtype={self.dtype})"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def parameters(self):
        """The reference's (frozen) weights; for memory accounting and tests."""
        return self.model.parameters()

    def num_bytes(self) -> int:
        """Memory of the reference's weights and buffers."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _to(self, device: torch.device) -> None:
        """Follow the trained model's device (once); a quantised model stays where it was loaded.
        (No trainer switches it back to train mode: it is not a registered submodule.)"""
        if not self.quantized and next(self.model.parameters()).device != device:
            self.model.to(device)

    @torch.no_grad()
    def hidden_and_head(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, StreamingHead]:
        """Final hidden states ``[B, T, H_ref]`` (no gradient) and the head to stream them through
        (``kwargs``, e.g. a packed batch's ``position_ids``, go to the model)."""
        self._to(input_ids.device)
        if not self._stream_checked:
            reason = streaming_unsupported_reason(self.model, check=not self.quantized)
            if reason is not None:
                raise ValueError(f"the reference model {self.name} cannot be streamed ({reason}); "
                                 "set model.streaming.streamed: false to use its full logits")
            self._stream_checked = True
        hidden = forward_hidden(self.model, input_ids, attention_mask, **kwargs)
        return hidden, streaming_head(self.model)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Full logits ``[B, T, V]`` (no gradient), for the non-streamed path."""
        self._to(input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits


def reference_source(objective: Any, model: str) -> str:
    """The model the reference of ``objective`` is loaded from: its ``reference_name``, else ``model``. A
    name that cannot be a model raises :class:`~bnll_lightning.models.ModelSourceError` saying it is the
    reference's (checked before any model loads)."""
    from bnll_lightning.models import ModelSourceError, resolve_model_path

    if not objective.reference_name:
        return model
    try:
        resolve_model_path(objective.reference_name)
    except ModelSourceError as err:
        owner = type(objective).__name__
        # from None: the CLI reports the innermost error of a chain, and this one says whose model it is
        raise ModelSourceError(f"model.objective.init_args.reference, the reference model of {owner}: {err}") from None
    return objective.reference_name


def load_reference(objective: Any, model: str, dtype: str | None = None, trust_remote_code: bool = False) -> FrozenReference:
    """The frozen reference an objective asks for: its ``reference_name`` if set, else ``model`` (the
    policy's source), in its ``reference_dtype`` (else ``dtype``), int8 if ``reference_load_in_8bit``."""
    return FrozenReference(
        reference_source(objective, model),
        dtype=objective.reference_dtype if objective.reference_dtype is not None else dtype,
        load_in_8bit=objective.reference_load_in_8bit,
        trust_remote_code=trust_remote_code,
    )
