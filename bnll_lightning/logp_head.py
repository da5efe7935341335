"""The log-p head: each target token's float32 log p (and statistics) of a batch, streamed or from full logits.

:meth:`LogpHead.from_model` decides once, from the model, how log p is computed: streamed chunk by
chunk from the final hidden states (``streaming.py``; checked once against ``model(...).logits``, a
model it cannot reproduce falls back to full logits with a warning), with the model's logit
post-processing (scale, softcap), the head matmul's dtype and the chunk size. The head holds no
weights and no model: each call takes the model and reads its head weight then, since FSDP and peft
swap the weight and Lightning may wrap the model after the head is built.

A batch holds ``input_ids``, ``attention_mask`` (or a packed batch's ``position_ids``) and ``labels``
(``IGNORE_INDEX`` off the targets); position ``t`` predicts token ``t + 1``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnll_lightning.constraints import PositiveInt
from bnll_lightning.objectives import IGNORE_INDEX, StatsRequest, TokenStats, token_logprobs, token_stats
from bnll_lightning.streaming import (
    hidden_and_head,
    streamed_eval_logprobs,
    streamed_token_stats,
    streaming_head,
    streaming_unsupported_reason,
)

if TYPE_CHECKING:
    from bnll_lightning.reference import FrozenReference

__all__ = ["LogpHead", "StreamingArgs", "model_inputs", "target_labels", "target_weights"]


@dataclass(frozen=True)
class StreamingArgs:
    """How each target token's log p is computed (``model.streaming``).

    Args:
        streamed: Compute log p chunk by chunk from the final hidden states, never holding the
            full [batch, tokens, vocab] logits. Checked once against the model's own logits on a
            few tokens; a model it cannot reproduce falls back to full logits, with a warning.
        chunk_size: Target tokens per chunk of the streamed path: peak logits memory is
            chunk_size x vocab floats.
        head_float32: Run the streamed output head's matmul in float32 even under bf16/fp16
            autocast. A bf16 head rounds each logit by about |z|·2⁻⁸, which the gradient
            weight p^α multiplies by α (measured in docs/benchmarks.md); float32 removes
            that at the cost of a float32 matmul over the vocabulary.
    """

    streamed: bool = True
    chunk_size: PositiveInt = 1024
    head_float32: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
    """The model's inputs for ``batch``. A packed batch (``position_ids``) goes without attention mask:
    transformers then builds a block-diagonal causal mask from the position ids (a new row wherever
    they do not count up by one), so no token attends to another row (``packing_unsupported_reason``)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": None, "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _logits(model: nn.Module, inputs: dict[str, Tensor | None]) -> Tensor:
    """The model's logits for ``inputs``, without its KV cache: with ``use_cache=True`` (the HF default)
    transformers ignores a packed batch's ``position_ids`` row boundaries, and packed rows attend across rows."""
    return model(**inputs, use_cache=False).logits


def target_labels(batch: dict[str, Tensor]) -> Tensor:
    """Each position's target: position t predicts token t + 1 (the labels shifted once); the last has none."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def target_weights(batch: dict[str, Tensor]) -> Tensor | None:
    """Each target's row weight, aligned with :func:`target_labels` (None when the data has no weights)."""
    return None if "weights" not in batch else F.pad(batch["weights"][:, 1:], (0, 1))


@dataclass
class LogpHead:
    """How a model's log p is computed: streamed or from full logits, and the streamed head's settings.

    Attributes:
        streamed: Chunk by chunk from the final hidden states (False: from ``model(...).logits``).
        chunk_size: Target tokens per chunk of the streamed path.
        dtype: The streamed head matmul's dtype; None: the autocast dtype, else the model's.
        scale: The factor the model applies to its logits (Cohere, Granite), None if none.
        softcap: The model's tanh softcap of its logits (Gemma 2/3), None if none.
    """

    streamed: bool = True
    chunk_size: int = 1024
    dtype: torch.dtype | None = None
    scale: float | None = None
    softcap: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module, args: StreamingArgs = StreamingArgs()) -> LogpHead:
        """The head for ``model`` as ``args`` asks: streamed only if the streamed recipe reproduces the
        model's log p (one forward of 8 tokens in eval mode), else full logits, with a warning."""
        streamed = args.streamed
        if streamed and (reason := streaming_unsupported_reason(model)):
            warnings.warn(f"streamed log p is off for this model ({reason}); using full logits", stacklevel=2)
            streamed = False
        # The post-processing is fixed by the model's config: read once; the weight is read per call.
        scale, softcap = streaming_head(model)[2:] if streamed else (None, None)
        dtype = torch.float32 if args.head_float32 else None
        return cls(streamed, args.chunk_size, dtype, scale, softcap)

    def stats(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        request: StatsRequest = StatsRequest(),
        reference: FrozenReference | None = None,
    ) -> TokenStats:
        """:class:`TokenStats` of ``batch``'s targets under ``model``: log p (differentiable) and what
        ``request`` asks for, the KL to ``reference`` and its log p included, from one pass, with the
        batch's row weights (:func:`target_weights`)."""
        if request.reference and reference is None:
            raise ValueError("the request asks for the KL to a reference model, and none was given")
        # target_labels, target_weights and model_inputs, inline: this runs every micro-batch.
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        weights = F.pad(batch["weights"][:, 1:], (0, 1)) if "weights" in batch else None
        if "position_ids" in batch:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": None, "position_ids": batch["position_ids"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = reference if request.reference else None
        if self.streamed:
            hidden, weight, bias = hidden_and_head(model, **inputs)
            ref_hidden, ref_head = reference.hidden_and_head(**inputs) if reference else (None, None)
            stats = streamed_token_stats(
                hidden, weight, labels, IGNORE_INDEX, self.chunk_size, bias, self.scale, self.softcap, self.dtype,
                entropy=request.entropy, topk=request.topk, reference_hidden=ref_hidden, reference_head=ref_head,
                kl=request.kl,
            )
        else:
            logits = _logits(model, inputs)
            stats = token_stats(logits, labels, request, ref_logits=reference.logits(**inputs) if reference else None)
        return stats._replace(weights=weights)

    @torch.no_grad()
    def eval(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(logp, mask, correct)`` of ``batch``'s targets without gradient (validation, the diagnosis):
        the numbers of :meth:`stats`, and whether each target is the argmax (False off the mask)."""
        labels, inputs = target_labels(batch), model_inputs(batch)
        if self.streamed:
            hidden, weight, bias = hidden_and_head(model, **inputs)
            return streamed_eval_logprobs(hidden, weight, labels, IGNORE_INDEX, self.chunk_size, bias, self.scale,
                                          self.softcap, self.dtype)
        logits = _logits(model, inputs)
        logp, mask = token_logprobs(logits, labels)
        return logp, mask, logits.argmax(-1) == labels
