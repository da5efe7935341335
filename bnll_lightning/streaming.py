"""Streamed per-token log-probabilities: ``log p`` of each target token without [B, T, V] logits.

Every objective is a function of one float32 number per target token. Full logits ``[B, T, V]``
(plus their float32 copy and gradient) dominate activation memory for a 150k vocabulary; here
the same numbers come from the final hidden states and the head weight, chunk by chunk of
target tokens, and a custom autograd function recomputes each chunk's logits in backward: peak
logits memory is ``chunk_size x V``.

``streamed_token_stats`` gives, from the same chunks and only when asked, what objectives beyond
log p need: the entropy of each token's distribution, its top-k entropy, and the KL divergence to a
frozen reference model (whose hidden states go through its own head chunk by chunk, in forward and
again in backward), with the reference's log p. One autograd function and one chunk loop serve
every caller: ``streamed_token_logprobs`` asks for nothing more, ``streamed_eval_logprobs`` (no
gradient) for whether each target is the argmax. ``logp_head.LogpHead`` applies them to a model.

Logit post-processing (Gemma 2/3 softcap, Cohere/Granite scale) is read from a short table of
config attributes (``LOGIT_CONFIG``), and ``streaming_unsupported_reason(model)`` checks the
whole recipe once against ``model(...).logits`` on a few tokens: any other post-processing, hook
or odd head makes callers fall back to full logits instead of streaming wrong numbers.

``labels`` are ALIGNED with positions: ``labels[:, t]`` is the target of position ``t`` (the
caller has already shifted); ``labels == ignore_index`` marks positions without a target.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributed.fsdp import FSDPModule

from bnll_lightning.modes import eval_mode
from bnll_lightning.objectives import IGNORE_INDEX, TokenStats

__all__ = [
    "StreamingHead", "forward_hidden", "head_logits", "hidden_and_head", "output_head", "streamed_eval_logprobs",
    "streamed_token_logprobs", "streamed_token_stats", "streaming_head", "streaming_unsupported_reason",
]

# Config attributes that post-process logits, and how: "mul"/"div" scale them, "cap" is a tanh
# softcap applied after the scales. A wrong or missing entry fails the check against the model's logits.
LOGIT_CONFIG: dict[str, Literal["mul", "div", "cap"]] = {
    "logit_scale": "mul",  # Cohere, Cohere 2
    "logits_scaling": "div",  # Granite family
    "lm_head_multiplier": "mul",  # Falcon-H1
    "final_logit_softcapping": "cap",  # Gemma 2/3 and relatives
    "logits_soft_cap": "cap",  # RecurrentGemma
}

# Vocabulary rows per block when a half-precision weight gradient is added into the float32
# accumulator: bounds that temporary to _GRAD_W_BLOCK x H instead of V x H.
_GRAD_W_BLOCK = 16384


def head_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, scale: float | None = None, softcap: float | None = None
) -> Tensor:
    """Float32 ``softcap(scale * (hidden @ weight^T + bias))`` with ``softcap(z) = c * tanh(z / c)``.

    The matmul runs in the inputs' dtype (or the autocast dtype); the result is a fresh buffer."""
    z = F.linear(hidden, weight, bias).float()
    if scale is not None:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The head matmul's dtype: the autocast dtype under autocast, else the inputs' common dtype."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _head_backward(h, weight, bias, needs, chunk_size, scale, softcap, dtype, logit_grad):
    """Gradients of hidden, head weight and bias, chunk by chunk of rows of ``h``.

    ``logit_grad(c, z)`` turns chunk ``c``'s recomputed float32 logits ``z`` (after scale and
    softcap; it may overwrite them) into d loss / d z; here that goes back through the softcap
    and scale into the hidden states and the head."""
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(h) if need_h else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    grad_w = None  # the first chunk's product allocates it: no zero-filled V x H buffer to add into
    # Several half-precision chunks accumulate the weight gradient in float32 (vocabulary blocks).
    half_acc = need_w and h.shape[0] > chunk_size and dtype != torch.float32
    if half_acc:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    with torch.autocast(h.device.type, enabled=False):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        for i in range(0, h.shape[0], chunk_size):
            c = slice(i, i + chunk_size)
            hc = h[c].to(dtype)
            z = head_logits(hc, w, b, scale, softcap)
            dcap = None if softcap is None else (z / softcap).square_().neg_().add_(1.0)  # 1 - tanh^2
            grad = logit_grad(c, z)
            if dcap is not None:
                grad.mul_(dcap)
            if scale is not None:
                grad.mul_(scale)
            if need_b:
                grad_b.add_(grad.sum(0))
            grad = grad.to(dtype)
            if need_h:
                grad_h[c] = grad @ w
            if half_acc:
                for v in range(0, grad.shape[1], _GRAD_W_BLOCK):
                    grad_w[v : v + _GRAD_W_BLOCK].add_(grad[:, v : v + _GRAD_W_BLOCK].t() @ hc)
            elif need_w and grad_w is None:
                grad_w = grad.t() @ hc
            elif need_w:
                grad_w.addmm_(grad.t(), hc)
    if need_w:
        grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


class _StreamedTokenStats(torch.autograd.Function):
    """``log p`` of N target tokens from their hidden states ``[N, H]``, chunk by chunk of tokens, plus
    what was asked for from the same chunks of logits.

    Outputs ``(logp, entropy, topk_entropy, kl, ref_logp, correct)`` over the N tokens, each ``[N]``
    (float32; ``correct``, whether the target is the argmax, bool) or empty when not requested. Only
    ``logp`` and ``kl`` carry a gradient (``kl`` w.r.t. the trained model only). Saves the inputs and
    the log-sum-exps; backward recomputes each chunk's logits (with a reference, its logits too), for
    the tokens whose gradient is not exactly 0 only (a selection objective trains on a fraction of
    them): memory stays a few ``chunk_size x V`` buffers, never ``N x V``."""

    @staticmethod
    def forward(ctx, h, weight, bias, h_ref, w_ref, b_ref, targets, chunk_size, head, ref_head, entropy, topk, kl,
                correct):
        n, device = h.shape[0], h.device
        scale, softcap, dtype = head
        lse = torch.empty(n, dtype=torch.float32, device=device)
        logp = torch.empty_like(lse)
        has_ref = h_ref is not None
        # Each output is [N] when asked for, else empty.
        f32, n_ref = {"dtype": torch.float32, "device": device}, n if has_ref else 0
        ent, ent_k = torch.empty(n if entropy else 0, **f32), torch.empty(n if topk > 0 else 0, **f32)
        kl_out, ref_logp, lse_r = torch.empty(n_ref, **f32), torch.empty(n_ref, **f32), torch.empty(n_ref, **f32)
        hit = torch.empty(n if correct else 0, dtype=torch.bool, device=device)
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            if has_ref:
                r_scale, r_softcap, r_dtype = ref_head
                wr, br = w_ref.to(r_dtype), None if b_ref is None else b_ref.to(r_dtype)
            for i in range(0, n, chunk_size):
                c = slice(i, i + chunk_size)
                z = head_logits(h[c].to(dtype), w, b, scale, softcap)
                lse[c] = torch.logsumexp(z, dim=-1)
                logp[c] = z.gather(1, targets[c, None])[:, 0] - lse[c]
                if correct:
                    hit[c] = z.argmax(-1) == targets[c]
                if topk > 0:
                    top = z.topk(min(topk, z.shape[1]), dim=-1).values
                    ent_k[c] = _entropy_of(top.sub_(torch.logsumexp(top, dim=-1, keepdim=True)))
                if not (entropy or has_ref):
                    continue
                logq = z.sub_(lse[c, None])  # log-softmax in place: no second V-wide buffer
                if entropy:
                    ent[c] = _entropy_of(logq)
                if has_ref:
                    zr = head_logits(h_ref[c].to(r_dtype), wr, br, r_scale, r_softcap)
                    lse_r[c] = torch.logsumexp(zr, dim=-1)
                    logr = zr.sub_(lse_r[c, None])
                    ref_logp[c] = logr.gather(1, targets[c, None])[:, 0]
                    if kl == "forward":  # sum q (log q - log p)
                        kl_out[c] = (logr.exp() * (logr - logq)).sum(-1)
                    else:  # sum p (log p - log q)
                        kl_out[c] = (logq.exp() * (logq - logr)).sum(-1)
        ctx.save_for_backward(h, weight, bias, h_ref, w_ref, b_ref, targets, lse, lse_r, kl_out)
        ctx.args = chunk_size, head, ref_head, kl
        ctx.mark_non_differentiable(ent, ent_k, ref_logp, hit)
        return logp, ent, ent_k, kl_out, ref_logp, hit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_ent, _grad_ent_k, grad_kl, _grad_ref_logp, _grad_hit):
        h_all, weight, bias, h_ref, w_ref, b_ref, targets, lse, lse_r, kl_t = ctx.saved_tensors
        chunk_size, head, ref_head, kl = ctx.args
        has_ref = h_ref is not None
        grad_logp = grad_logp.float()
        grad_kl = grad_kl.float() if has_ref else None
        # A token whose gradient is exactly 0 (not selected by ThresholdedNLL / TopFraction, or p^alpha
        # underflowed) adds exactly 0 to every gradient: skip its head work.
        nonzero = grad_logp != 0
        if has_ref:
            nonzero |= grad_kl != 0
        rows = nonzero.nonzero()[:, 0]  # one host sync per backward
        rows = None if rows.numel() == h_all.shape[0] else rows  # None: every row
        h = h_all if rows is None else h_all[rows]
        if rows is not None:
            targets, lse, grad_logp = targets[rows], lse[rows], grad_logp[rows]
            if has_ref:
                h_ref, lse_r, kl_t, grad_kl = h_ref[rows], lse_r[rows], kl_t[rows], grad_kl[rows]
        if has_ref:
            r_scale, r_softcap, r_dtype = ref_head
            wr, br = w_ref.to(r_dtype), None if b_ref is None else b_ref.to(r_dtype)

        def logit_grad(c: slice, z: Tensor) -> Tensor:
            g = grad_logp[c, None]
            if not has_ref:
                grad = z.sub_(lse[c, None]).exp_().mul_(-g)  # d logp / d logits = onehot - softmax
                return grad.scatter_add_(1, targets[c, None], g)
            k = grad_kl[c, None]
            logq = z.sub_(lse[c, None])
            zr = head_logits(h_ref[c].to(r_dtype), wr, br, r_scale, r_softcap)
            logr = zr.sub_(lse_r[c, None])
            if kl == "forward":
                # d KL(q||p) / d z = p - q, so the chunk's gradient is p (k - g) - k q + onehot g.
                grad = logq.exp_().mul_(k - g).sub_(logr.exp_().mul_(k))
            else:
                # d KL(p||q) / d z = p (log p - log q - KL): gradient p (k (log p - log q - KL) - g) + onehot g.
                grad = logr.neg_().add_(logq).sub_(kl_t[c, None]).mul_(k).sub_(g).mul_(logq.exp_())
            return grad.scatter_add_(1, targets[c, None], g)

        grad_h, grad_w, grad_b = _head_backward(
            h, weight, bias, ctx.needs_input_grad[:3], chunk_size, *head, logit_grad
        )
        if rows is not None and grad_h is not None:
            grad_h = torch.zeros_like(h_all).index_copy_(0, rows, grad_h)
        return (grad_h, grad_w, grad_b) + (None,) * 11


def _entropy_of(logq: Tensor) -> Tensor:
    """Entropy along dim 1 from float32 log-probabilities (a chunk's rows)."""
    return -(logq.exp() * logq).sum(-1)


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float | None, softcap: float | None,
                what: str = "") -> tuple[float | None, float | None]:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{what}weight must be [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{what}bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if scale is not None and not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"{what}scale must be finite and non-zero, got {scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{what}softcap must be finite and positive, got {softcap}")
    return (None if scale is None or scale == 1 else float(scale)), (None if softcap is None else float(softcap))


def _streamed(hidden, weight, labels, ignore_index, chunk_size, bias, scale, softcap, head_dtype, entropy, topk,
              reference_hidden, reference_head, kl, correct) -> tuple[Tensor, list[Tensor | None]]:
    """Checked arguments through :class:`_StreamedTokenStats`: ``(mask, [logp, entropy, topk_entropy,
    kl, ref_logp, correct])`` at ``[B, T]``, None where not requested."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden [B, T, H] and labels [B, T] expected, got {tuple(hidden.shape)}, {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    if kl not in ("forward", "reverse"):
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    if (reference_hidden is None) != (reference_head is None):
        raise ValueError("reference_hidden and reference_head go together")
    scale, softcap = _check_head(hidden, weight, bias, scale, softcap)
    mask = labels != ignore_index
    idx = mask.flatten().nonzero()[:, 0]
    h = hidden.flatten(0, 1).index_select(0, idx)
    targets = labels.flatten().index_select(0, idx).long()
    h_ref = w_ref = b_ref = ref_head = None
    if reference_hidden is not None:
        if reference_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"reference_hidden {tuple(reference_hidden.shape)} does not match hidden {tuple(hidden.shape)}")
        w_ref, b_ref = reference_head.weight, reference_head.bias
        if w_ref.shape[0] != weight.shape[0]:
            raise ValueError(f"the reference's vocabulary ({w_ref.shape[0]}) differs from the model's ({weight.shape[0]})")
        r_scale, r_softcap = _check_head(reference_hidden, w_ref, b_ref, reference_head.scale, reference_head.softcap,
                                         "reference ")
        h_ref = reference_hidden.detach().flatten(0, 1).index_select(0, idx)
        w_ref, b_ref = w_ref.detach(), None if b_ref is None else b_ref.detach()
        ref_head = (r_scale, r_softcap, _compute_dtype(reference_hidden, w_ref))
    outs = _StreamedTokenStats.apply(
        h, weight, bias, h_ref, w_ref, b_ref, targets, int(chunk_size),
        (scale, softcap, head_dtype or _compute_dtype(hidden, weight)), ref_head, bool(entropy), int(topk), kl,
        bool(correct),
    )
    wanted = (True, entropy, topk > 0, h_ref is not None, h_ref is not None, correct)
    # Each requested [N] output back to [B, T], 0 off the targets.
    return mask, [o.new_zeros(mask.numel()).index_copy_(0, idx, o).view(mask.shape) if w else None
                  for o, w in zip(outs, wanted)]


def streamed_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    head_dtype: torch.dtype | None = None,
    *,
    entropy: bool = False,
    topk: int = 0,
    reference_hidden: Tensor | None = None,
    reference_head: StreamingHead | None = None,
    kl: Literal["forward", "reverse"] = "forward",
) -> TokenStats:
    """:class:`~bnll_lightning.objectives.TokenStats` from hidden states, without ``[B, T, V]`` logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states (any float dtype).
        weight: ``[V, H]`` output-head weight (may be tied to the input embedding, may be frozen).
        labels: ``[B, T]`` targets aligned with ``hidden``; ``ignore_index`` marks no target.
        chunk_size: Target tokens whose logits exist at once (peak ``chunk_size x V``).
        bias: Optional ``[V]`` head bias.
        scale: Optional factor on the logits (Cohere ``logit_scale``, Granite ``1 / logits_scaling``).
        softcap: Optional ``c``: logits become ``c * tanh(logits / c)`` after ``scale`` (Gemma 2/3).
        head_dtype: The head matmul's dtype (``torch.float32``: no bf16 rounding of the logits under
            bf16 autocast); None: the autocast dtype under autocast, else the common dtype of
            ``hidden`` and ``weight``. Everything after the matmul is float32.
        entropy: Also the entropy of each token's full distribution.
        topk: k > 0: also the entropy of the top-k logits renormalised.
        reference_hidden: The frozen reference's ``[B, T, H_ref]`` hidden states, with its
            ``reference_head`` (same vocabulary): also the per-token KL in direction ``kl``
            (``forward`` = KL(ref || model)) and the reference's log p. The reference gets no gradient.

    All come from the chunks that give log p (the model's head matmul is not repeated; the
    reference's head runs per chunk); nothing requested costs nothing beyond log p.

    Returns:
        ``logp`` ``[B, T]`` float32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, 0 where
        there is no target; ``mask`` ``[B, T]`` bool, ``labels != ignore_index``; the requested
        statistics (None otherwise), 0 off the mask.
    """
    mask, (logp, ent, ent_k, kl_t, ref_logp, _) = _streamed(
        hidden, weight, labels, ignore_index, chunk_size, bias, scale, softcap, head_dtype, entropy, topk,
        reference_hidden, reference_head, kl, False,
    )
    return TokenStats(logp, mask, ent, ent_k, kl_t, ref_logp)


def streamed_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    head_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(logp, mask)`` of :func:`streamed_token_stats` (same arguments), nothing else requested."""
    stats = streamed_token_stats(hidden, weight, labels, ignore_index, chunk_size, bias, scale, softcap, head_dtype)
    return stats.logp, stats.mask


@torch.no_grad()
def streamed_eval_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    head_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, mask, correct)`` without gradient (validation, the diagnosis): the numbers of
    :func:`streamed_token_logprobs` (same arguments, same head dtype) plus, from the same chunks of
    logits, whether each target is their argmax (``correct``, bool ``[B, T]``, False off the mask)."""
    mask, (logp, *_, correct) = _streamed(hidden, weight, labels, ignore_index, chunk_size, bias, scale, softcap,
                                          head_dtype, False, 0, None, None, "forward", True)
    return logp, mask, correct


# --------------------------------------------------------------------------------------------
# Models: find the decoder body and the head; check that streaming reproduces model(...).logits
# --------------------------------------------------------------------------------------------


class StreamingHead(NamedTuple):
    """What ``streamed_token_logprobs`` needs to reproduce a model's logits."""

    weight: Tensor
    bias: Tensor | None
    scale: float | None
    softcap: float | None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under torch.compile and peft (LoRA layers stay injected in it)."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """``(the model _unwrap gives, None)``, or ``(None, reason)`` under peft prompt/prefix tuning, whose
    virtual tokens make the decoder body alone not the model."""
    model = getattr(model, "_orig_mod", model)
    cfg = getattr(model, "active_peft_config", None)
    if getattr(cfg, "is_prompt_learning", False):
        return None, f"peft prompt-learning adapter ({type(cfg).__name__}) adds virtual tokens"
    return (model.get_base_model() if hasattr(model, "get_base_model") else model), None


def _head(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None, str | None]:
    """``(base, head, None)``: the model ``_base`` gives and the plain ``nn.Linear`` its head runs; else
    ``(base, None, reason)``."""
    base, reason = _base(model)
    if base is None:
        return None, None, reason
    wrapper = head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head).__name__ == "ModulesToSaveWrapper":  # peft: the trainable copy, when active
        active = head.active_adapters
        use_copy = not head.disable_adapters and active and all(a in head.modules_to_save for a in active)
        head = head.modules_to_save[active[0]] if use_copy else head.original_module
    if head is None:
        return base, None, f"{type(base).__name__} has no output embeddings"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        reason = f"output head is {type(head).__name__}, not a plain nn.Linear (adapter, quantised or custom)"
        return base, None, reason
    if type(head.weight) not in (Tensor, nn.Parameter) or head.weight.is_meta:
        return base, None, "output head weight is on the meta device or sharded/subclassed"
    # FSDP2's own hooks gather the root's weights; its steps run inside the root's forward (strategies.py).
    hooked = [m for m in (model, base, wrapper, head) if not isinstance(m, FSDPModule)]
    if any(m._forward_hooks or m._forward_pre_hooks for m in hooked):
        return base, None, "the model or its head has forward hooks, which streaming would bypass"
    return base, head, None


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] | None)``: the live head parameters (peft-aware). Without the
    logit post-processing: use ``streaming_head`` for that. ``ValueError`` if not a plain Linear."""
    _, head, reason = _head(model)
    if head is None:
        raise ValueError(f"streaming unsupported: {reason}")
    return head.weight, head.bias


def _logit_transform(model: nn.Module) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` that the model's config says its forward applies (``LOGIT_CONFIG``)."""
    config = getattr(_unwrap(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, softcap = 1.0, None
    for attr, how in LOGIT_CONFIG.items():
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and value:  # None/0: not applied
            if how == "cap":
                softcap = float(value)
            else:
                scale = scale * value if how == "mul" else scale / value
    return (None if scale == 1 else scale), softcap


def streaming_head(model: nn.Module) -> StreamingHead:
    """Head weight/bias plus the ``scale``/``softcap`` the model applies to its logits, from its
    config. Structural checks only (``ValueError``); ``streaming_unsupported_reason`` also runs the model."""
    return StreamingHead(*output_head(model), *_logit_transform(model))


def forward_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Final hidden states ``[B, T, H]``: the decoder body without the head (``get_decoder()``:
    ``model.model`` for Llama, ``model.model.decoder`` for OPT). LoRA layers of a peft model and
    gradient checkpointing live inside the body, so both apply. Extra ``kwargs`` go to the body."""
    base, reason = _base(model)
    if base is None:
        raise NotImplementedError(f"forward_hidden: {reason}")
    return _body_hidden(base, input_ids, attention_mask, **kwargs)


def hidden_and_head(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden [B, T, H], weight [V, H], bias [V] | None)``: :func:`forward_hidden` and :func:`output_head`
    from one look-up of the model's parts (what a training step needs)."""
    base, head, reason = _head(model)
    if head is None:
        raise ValueError(f"streaming unsupported: {reason}")
    return _body_hidden(base, input_ids, attention_mask, **kwargs), head.weight, head.bias


def _body_hidden(base: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
    """The final hidden states of ``base``'s decoder body, without KV cache unless asked."""
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(body, nn.Module) or body is base:
        raise ValueError(f"cannot locate the decoder body of {type(base).__name__}")
    kwargs.setdefault("use_cache", False)
    out = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def _check_against_logits(model: nn.Module, head: StreamingHead, seq_len: int = 8) -> str | None:
    """Compare ``log_softmax(model(ids).logits)`` with the streamed recipe on a few tokens."""
    emb = _unwrap(model).get_input_embeddings()
    n_ids = min(head.weight.shape[0], getattr(emb, "num_embeddings", head.weight.shape[0]))
    ids = torch.randint(0, n_ids, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(emb.weight.device)
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    hidden = forward_hidden(model, ids, torch.ones_like(ids))
    if ref.shape != (*hidden.shape[:2], head.weight.shape[0]):
        return f"model logits are {tuple(ref.shape)}, the head gives vocabulary {head.weight.shape[0]}"
    dtype = _compute_dtype(hidden, head.weight)
    bias = None if head.bias is None else head.bias.to(dtype)
    ours = head_logits(hidden.to(dtype), head.weight.to(dtype), bias, head.scale, head.softcap)
    err = (ref.float().log_softmax(-1) - ours.log_softmax(-1)).abs().max().item()
    # bf16/fp16 logits (or TF32 matmuls) round differently in the model and here.
    low = dtype != torch.float32 or ref.dtype != torch.float32 or (
        ref.is_cuda and torch.get_float32_matmul_precision() != "highest")
    tol = (2**-5 if low else 1e-4) * (1 + ref.float().abs().max().item())
    if not err <= tol:
        return f"streamed log p differs from model(...).logits by {err:.3g} (tolerance {tol:.3g})"
    return None


def streaming_unsupported_reason(model: nn.Module, check: bool = True) -> str | None:
    """``None`` if ``streaming_head(model)`` reproduces the model's log-probabilities, else why not.

    Structural reasons: no output embeddings, a head that is not a plain ``nn.Linear`` (LoRA on
    the head, quantised, custom), a meta/sharded head weight, forward hooks on the model or head,
    peft prompt learning. ``check=True`` then runs the model once in eval mode on 8 tokens and
    compares ``log_softmax(model(...).logits)`` with the streamed recipe at every position and
    vocabulary entry: unknown logit post-processing, hooks or heads show up as a difference.
    Run it once when the model is set up (one tiny forward), not per step.
    """
    _, linear, reason = _head(model)
    if linear is None or not check:
        return reason
    head = StreamingHead(linear.weight, linear.bias, *_logit_transform(model))
    try:
        with eval_mode(model):
            reason = _check_against_logits(model, head)
    except (TypeError, ValueError, NotImplementedError) as e:
        # A model that cannot run on text alone (it wants pixel values, ...): do not stream it. Anything
        # else (out of memory, a bug) surfaces here, not as a silent fall-back and a later, misleading OOM.
        reason = f"{type(e).__name__}: {e}"
    return None if reason is None else f"check: {reason} (scale={head.scale}, softcap={head.softcap})"

