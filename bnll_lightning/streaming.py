"""Streamed per-token log-probabilities: ``log p`` of each target token without [B, T, V] logits.

Every objective in this package is a function of one float32 number per target token,
``log p(y_t | x, y_<t)``, plus a mask. The naive way to get it materialises the full logits
tensor ``[B, T, V]`` (and its float32 upcast and its gradient), which for a 150k vocabulary
dominates activation memory. This module computes the same numbers from the final hidden
states and the output-head weight, in chunks of target tokens:

* only positions that have a target are projected (prompt and padding positions need no logits);
* per chunk of ``chunk_size`` selected tokens: ``logits = h @ W^T (+ b)`` in the compute dtype
  (bf16 under bf16), upcast to float32, optional logit post-processing (``scale`` and tanh
  ``softcap``), float32 logsumexp, ``log p = logit[target] - lse``; the chunk's logits are then
  discarded;
* a custom autograd function recomputes each chunk's logits in backward, so forward+backward
  peak memory holds one chunk's logits (``O(chunk_size * V)``), not all of them.

Public API
----------
``streamed_token_logprobs(hidden, weight, labels, ...)``  -> ``(logp [B,T] float32, mask [B,T] bool)``
``naive_token_logprobs(logits, labels, ...)``             -> same contract, from full logits
``output_head(model)``                                     -> ``(weight, bias)``
``logit_transform(model)``                                 -> ``(scale, softcap)`` the model applies
``streaming_head(model)``                                  -> ``StreamingHead(weight, bias, scale, softcap)``
``streaming_unsupported_reason(model, probe=False)``       -> ``None`` or a reason string
``forward_hidden(model, input_ids, attention_mask)``       -> last hidden states ``[B,T,H]``
``model_token_logprobs(model, input_ids, labels, ...)``    -> one call: streamed if possible, else naive

``labels`` are always ALIGNED with the positions: ``labels[:, t]`` is the target of position ``t``
(the caller has already shifted); ``labels == ignore_index`` marks positions without a target.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import operator
import textwrap
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "StreamingHead",
    "forward_hidden",
    "logit_transform",
    "model_token_logprobs",
    "naive_token_logprobs",
    "output_head",
    "streamed_token_logprobs",
    "streaming_head",
    "streaming_unsupported_reason",
]

# Vocabulary rows per block when a half-precision chunk's weight gradient is added into the
# float32 accumulator: bounds the temporary to _GRAD_W_BLOCK x H instead of V x H.
_GRAD_W_BLOCK = 16384


# --------------------------------------------------------------------------------------------
# Reference: full logits
# --------------------------------------------------------------------------------------------


def naive_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(logp, mask)`` from full logits ``[B, T, V]`` and aligned labels ``[B, T]``.

    ``log_softmax`` in float32 over the vocabulary, gather the target; ``logp`` is zero where
    ``mask`` (``labels != ignore_index``) is False. Memory: materialises float32 ``[B, T, V]``.
    """
    mask = labels != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~mask, 0.0)
    return logp, mask


# --------------------------------------------------------------------------------------------
# Streamed computation
# --------------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the head matmul: the autocast dtype under autocast, else the common dtype."""
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
    keep_tanh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of one chunk: ``softcap(scale * (h @ w^T + b))``.

    Returns ``(logits, t)``; with ``keep_tanh`` and a softcap, ``t = tanh(scale * raw / softcap)``
    (backward needs it), else ``t`` is None. The returned tensors are fresh buffers (safe to
    modify in place).
    """
    raw = F.linear(h, w, b)
    z = raw.float()  # a new buffer unless raw is already float32 (then raw is ours anyway)
    if scale is not None:
        z.mul_(scale)
    if softcap is None:
        return z, None
    z.div_(softcap).tanh_()
    if keep_tanh:
        return z * softcap, z
    return z.mul_(softcap), None


class _StreamedTargetLogprob(torch.autograd.Function):
    """``log p`` of N target tokens from their hidden states, chunked over tokens.

    Saves only the inputs (selected hidden ``[N, H]``, weight, bias, targets) and ``lse [N]``;
    backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, scale, softcap, compute_dtype):
        n = h.shape[0]
        device_type = h.device.type
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        with torch.autocast(device_type=device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                z, _ = _chunk_logits(h[start:end].to(compute_dtype), w, b, scale, softcap)
                lse_c = torch.logsumexp(z, dim=-1)
                tgt = z.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
                lse[start:end] = lse_c
                logp[start:end] = tgt - lse_c
                del z
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.scale = scale
        ctx.softcap = softcap
        ctx.compute_dtype = compute_dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 8
        chunk_size, scale, softcap, cdt = ctx.chunk_size, ctx.scale, ctx.softcap, ctx.compute_dtype
        n = h.shape[0]
        n_chunks = -(-n // chunk_size)
        grad_logp = grad_logp.float()

        grad_h = torch.empty_like(h) if need_h else None
        grad_w = grad_w_acc = grad_b_acc = None
        if need_w and n_chunks != 1:
            grad_w_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_b:
            grad_b_acc = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)

        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                hc = h[start:end].to(cdt)
                g = grad_logp[start:end].unsqueeze(1)
                tc = targets[start:end].unsqueeze(1)
                z, t = _chunk_logits(hc, w, b, scale, softcap, keep_tanh=True)
                # d logp / d logits = onehot - softmax, softmax = exp(logits - lse)
                grad = z.sub_(lse[start:end].unsqueeze(1)).exp_().mul_(g.neg())
                grad.scatter_add_(1, tc, g)
                if t is not None:  # d/du [c * tanh(u / c)] = 1 - tanh^2
                    grad.mul_(t.mul_(t).neg_().add_(1.0))
                    del t
                if scale is not None:
                    grad.mul_(scale)
                if need_b:
                    grad_b_acc.add_(grad.sum(0))
                gl = grad.to(cdt)
                del grad, z
                if need_h:
                    grad_h[start:end] = (gl @ w).to(h.dtype)
                if need_w:
                    if grad_w_acc is None:  # single chunk: one matmul, no accumulator
                        grad_w = (gl.t() @ hc).to(weight.dtype)
                    elif gl.dtype == torch.float32:
                        grad_w_acc.addmm_(gl.t(), hc.float())
                    else:  # half-precision matmul, float32 accumulation in vocab blocks
                        for v0 in range(0, gl.shape[1], _GRAD_W_BLOCK):
                            v1 = min(v0 + _GRAD_W_BLOCK, gl.shape[1])
                            grad_w_acc[v0:v1].add_(gl[:, v0:v1].t() @ hc)
                del gl
        if need_w:
            if grad_w is None:
                grad_w = (
                    grad_w_acc.to(weight.dtype)
                    if grad_w_acc is not None
                    else torch.zeros_like(weight)
                )
        grad_b = grad_b_acc.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _check_postprocess(scale: float | None, softcap: float | None) -> tuple[float | None, float | None]:
    if scale is not None:
        scale = float(scale)
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"scale must be finite and non-zero, got {scale}")
        if scale == 1.0:
            scale = None
    if softcap is not None:
        softcap = float(softcap)
        if not math.isfinite(softcap) or softcap <= 0.0:
            raise ValueError(f"softcap must be finite and positive, got {softcap}")
    return scale, softcap


def streamed_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, mask)`` from hidden states and the output head, without ``[B, T, V]`` logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states (any float dtype).
        weight: ``[V, H]`` output-head weight (may be tied to the input embedding; may be frozen).
        labels: ``[B, T]`` targets ALIGNED with ``hidden`` (``labels[:, t]`` is the target of
            position ``t``); ``ignore_index`` marks positions without a target.
        chunk_size: number of target tokens whose logits exist at once (peak ``chunk_size x V``).
        bias: optional ``[V]`` head bias.
        scale: optional scalar, logits are ``scale * (h @ W^T + b)`` (Cohere ``logit_scale``,
            Granite ``1 / logits_scaling``, ...).
        softcap: optional ``c``, logits are then ``c * tanh(logits / c)`` (Gemma 2/3 final logit
            softcapping).

    The head matmul runs in the autocast dtype under autocast, else in the common dtype of
    ``hidden`` and ``weight``; everything after it is float32.

    Returns:
        ``logp``: ``[B, T]`` float32 (differentiable w.r.t. ``hidden``, ``weight`` and ``bias``),
        zero where there is no target; ``mask``: ``[B, T]`` bool, ``labels != ignore_index``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden[:2] {tuple(hidden.shape[:2])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale, softcap = _check_postprocess(scale, softcap)

    bsz, seq, hdim = hidden.shape
    mask = labels != ignore_index
    idx = mask.reshape(-1).nonzero().squeeze(1)
    h_sel = hidden.reshape(bsz * seq, hdim).index_select(0, idx)
    targets = labels.reshape(-1).index_select(0, idx).long()
    logp_sel = _StreamedTargetLogprob.apply(
        h_sel, weight, bias, targets, int(chunk_size), scale, softcap, _compute_dtype(hidden, weight)
    )
    logp = torch.zeros(bsz * seq, dtype=torch.float32, device=hidden.device)
    logp = logp.index_copy(0, idx, logp_sel).view(bsz, seq)
    return logp, mask


# --------------------------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------------------------


class StreamingHead(NamedTuple):
    """Everything ``streamed_token_logprobs`` needs to reproduce a model's logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float | None
    softcap: float | None


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under torch.compile / peft wrappers (LoRA layers stay injected)."""
    for _ in range(8):
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
        elif type(model).__module__.startswith("peft.") and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model  # peft BaseTuner (e.g. LoraModel)
        else:
            break
    return model


def _prompt_learning_reason(model: nn.Module) -> str | None:
    """peft prompt/prefix tuning inserts virtual tokens: the decoder body alone is not the model."""
    for _ in range(8):
        cfgs = getattr(model, "peft_config", None)
        if isinstance(cfgs, dict) and hasattr(model, "get_base_model"):
            active = getattr(model, "active_adapter", None)
            cfg = cfgs.get(active) if isinstance(active, str) else None
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                return f"peft prompt-learning adapter ({type(cfg).__name__}) adds virtual tokens"
            return None
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def _resolve_head_module(head: nn.Module) -> nn.Module:
    """Resolve peft ``ModulesToSaveWrapper`` to the module its forward would actually use."""
    if type(head).__name__ == "ModulesToSaveWrapper" and hasattr(head, "modules_to_save"):
        active = list(getattr(head, "active_adapters", []) or [])
        adapters = getattr(head, "_adapters", set())
        if head.disable_adapters or not active or any(a not in adapters for a in active):
            return head.original_module
        return head.modules_to_save[active[0]]
    return head


def _head_module(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """``(head, None)`` or ``(None, reason)``; ``model`` must be unwrapped."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    resolved = _resolve_head_module(head)
    if not isinstance(resolved, nn.Linear) or type(resolved).forward is not nn.Linear.forward:
        return None, (
            f"output head is {type(head).__name__}, not a plain nn.Linear "
            "(adapter-wrapped, quantized or custom heads are not streamed)"
        )
    w = resolved.weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        return None, f"output head weight is not a floating-point matrix ({type(w).__name__})"
    if w.device.type == "meta":
        return None, "output head weight is on the meta device (offloaded or not materialised)"
    if type(w) not in (torch.Tensor, nn.Parameter):
        return None, f"output head weight is a {type(w).__name__} (sharded/subclassed tensors are not streamed)"
    if resolved._forward_hooks or resolved._forward_pre_hooks or head._forward_hooks or head._forward_pre_hooks:
        return None, "output head has forward hooks that may change its output"
    return resolved, None


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] | None)`` of a causal LM's output head (peft-aware).

    Raises ``ValueError`` when the head is missing or not a plain ``nn.Linear``. The returned
    weight is the live parameter (tied to the input embedding when the model ties them).
    """
    head, reason = _head_module(_unwrap(model))
    if head is None:
        raise ValueError(reason)
    return head.weight, head.bias


def _decoder_body(model: nn.Module) -> nn.Module:
    """The module a causal LM's forward calls to get hidden states (``model.model`` for Llama)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and body is not model:
        return body
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    if isinstance(body, nn.Module) and body is not model:
        return body
    raise ValueError(f"cannot locate the decoder body of {type(model).__name__}")


def forward_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Run the decoder body without the output head; return the last hidden states ``[B, T, H]``.

    Works for plain Hugging Face causal LMs, peft-wrapped models (LoRA layers are injected into
    the body, so they are used) and under gradient checkpointing (handled inside the layers).
    Extra ``kwargs`` (e.g. ``position_ids``) go to the body. ``use_cache`` is off.
    """
    reason = _prompt_learning_reason(model)
    if reason is not None:
        raise NotImplementedError(f"forward_hidden: {reason}")
    body = _decoder_body(_unwrap(model))
    kwargs.setdefault("use_cache", False)
    out = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


# --------------------------------------------------------------------------------------------
# What the model does to logits after the head: static analysis of its forward
# --------------------------------------------------------------------------------------------
#
# Instead of a list of model types, the causal LM's ``forward`` source is symbolically
# executed: values derived from the body output and the head call are tracked with the
# scalar multiplications/divisions and tanh applied to them; any other use (vocabulary slicing,
# additive terms, other modules or functions applied to the logits, in-place edits, unknown
# conditions that change them) makes the model unsupported. Scalars (``self.config.x``,
# ``self.logit_scale``, ``self.model.lm_head_multiplier``, ...) are read from the live model.
# The result is ``logits = b * tanh(a * raw)`` or ``logits = a * raw``; both are expressible as
# ``softcap(scale * raw)``. Conservative by construction: anything not understood -> reason.

_UNKNOWN = ("unknown",)
_TRACKED = frozenset({"body", "hidden", "logits", "bad"})
_TANH_FUNCS = frozenset({"torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh"})
_PASSTHROUGH_METHODS = frozenset({"float", "contiguous", "to", "clone", "type_as"})
_CMP = {
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}


class _Analysis(NamedTuple):
    scale: float | None
    softcap: float | None
    hidden_scaled: bool
    reason: str | None


@functools.lru_cache(maxsize=64)
def _forward_ast(func) -> ast.FunctionDef | None:
    try:
        src = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


class _Ref:
    """An arbitrary Python object in the symbolic state, compared by identity."""

    __slots__ = ("x",)

    def __init__(self, x: Any):
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.x is self.x

    def __hash__(self) -> int:
        return id(self.x)


def _scalar(x: Any) -> tuple:
    """``("num", value)`` for numbers/None/bool (and frozen 1-element tensors), else ``("obj", ref)``."""
    if x is None or isinstance(x, (bool, int, float)):
        return ("num", x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.requires_grad and x.device.type != "meta":
        return ("num", float(x.detach().cpu().reshape(())))
    return ("obj", _Ref(x))


class _Interp:
    def __init__(self, model: nn.Module, heads: tuple[nn.Module, ...], body: nn.Module):
        self.model = model
        self.heads = heads  # the output-embeddings module and what it resolves to (peft wrappers)
        self.body = body
        self.returns: list[tuple] = []

    # -- expressions ------------------------------------------------------------------------
    def bad(self, node) -> tuple:
        try:
            text = ast.unparse(node)
        except Exception:  # pragma: no cover
            text = type(node).__name__
        return ("bad", text if len(text) < 160 else text[:157] + "...")

    def ev(self, node, env: dict) -> tuple:
        m = getattr(self, "ev_" + type(node).__name__, None)
        if m is not None:
            return m(node, env)
        return self.bad(node) if self.touches(node, env) else _UNKNOWN

    def touches(self, node, env) -> bool:
        return any(
            isinstance(n, ast.Name) and env.get(n.id, _UNKNOWN)[0] in _TRACKED for n in ast.walk(node)
        )

    def ev_Constant(self, node, env):
        v = node.value
        return ("num", v) if v is None or isinstance(v, (bool, int, float)) else _UNKNOWN

    def ev_Name(self, node, env):
        if node.id == "self":
            return ("obj", _Ref(self.model))
        return env.get(node.id, _UNKNOWN)

    def ev_NamedExpr(self, node, env):
        v = self.ev(node.value, env)
        env[node.target.id] = v
        return v

    def ev_Attribute(self, node, env):
        v = self.ev(node.value, env)
        if v[0] == "body" and node.attr == "last_hidden_state":
            return ("hidden", ())
        if v[0] == "obj":
            try:
                return _scalar(getattr(v[1].x, node.attr))
            except Exception:
                return _UNKNOWN
        if v[0] in _TRACKED:
            # .shape / .dtype / .device of a tracked tensor are harmless; anything else is not.
            return _UNKNOWN if node.attr in ("shape", "dtype", "device", "ndim") else self.bad(node)
        return _UNKNOWN

    def ev_Subscript(self, node, env):
        v = self.ev(node.value, env)
        if v[0] == "body":
            s = node.slice
            if isinstance(s, ast.Constant) and s.value == 0:
                return ("hidden", ())
            return self.bad(node)
        if v[0] == "hidden":
            s = node.slice
            elts = s.elts if isinstance(s, ast.Tuple) else [s]
            if any(isinstance(e, ast.Constant) and e.value is Ellipsis for e in elts[:-1]) or (
                isinstance(elts[-1], ast.Constant) and elts[-1].value is Ellipsis
            ):
                return self.bad(node)
            full_last = isinstance(elts[-1], ast.Slice) and all(
                getattr(elts[-1], k) is None for k in ("lower", "upper", "step")
            )
            if len(elts) <= 2 or (len(elts) == 3 and full_last):  # batch/position indexing only
                return v
            return self.bad(node)
        if v[0] in _TRACKED:
            return self.bad(node)
        return _UNKNOWN

    def _op(self, v: tuple, op: str, x: float, node) -> tuple:
        if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
            return self.bad(node)
        if v[0] == "hidden":
            return ("hidden", v[1] + ((op, float(x)),))
        if v[0] == "logits":
            return ("logits", v[1], v[2] + ((op, float(x)),))
        return self.bad(node)

    def ev_BinOp(self, node, env):
        a, b = self.ev(node.left, env), self.ev(node.right, env)
        op = type(node.op)
        if a[0] in ("hidden", "logits") and b[0] == "num" and op in (ast.Mult, ast.Div):
            return self._op(a, "mul" if op is ast.Mult else "div", b[1], node)
        if b[0] in ("hidden", "logits") and a[0] == "num" and op is ast.Mult:
            return self._op(b, "mul", a[1], node)
        if a[0] in _TRACKED or b[0] in _TRACKED:
            return self.bad(node)
        if a[0] == "num" and b[0] == "num" and isinstance(a[1], (int, float)) and isinstance(b[1], (int, float)):
            fn = {ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Add: operator.add, ast.Sub: operator.sub}
            if op in fn:
                try:
                    return ("num", fn[op](a[1], b[1]))
                except ZeroDivisionError:
                    return _UNKNOWN
        return _UNKNOWN

    def ev_IfExp(self, node, env):
        c = self.cond(node.test, env)
        if c is True:
            return self.ev(node.body, env)
        if c is False:
            return self.ev(node.orelse, env)
        a, b = self.ev(node.body, env), self.ev(node.orelse, env)
        if a == b:
            return a
        return self.bad(node) if (a[0] in _TRACKED or b[0] in _TRACKED) else _UNKNOWN

    def _is_self_attr(self, node) -> Any:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return getattr(self.model, node.attr, None)
        return None

    def ev_Call(self, node, env):
        func = node.func
        target = self._is_self_attr(func)
        if target is not None and target is self.body:
            return ("body",)
        if target is not None and any(target is h for h in self.heads):
            args = list(node.args) + [k.value for k in node.keywords if k.arg == "input"]
            if len(args) != 1 or any(k.arg != "input" for k in node.keywords):
                return self.bad(node)
            x = self.ev(args[0], env)
            if x[0] != "hidden":
                return self.bad(node)
            return ("logits", x[1], ())
        fname = None
        try:
            fname = ast.unparse(func)
        except Exception:  # pragma: no cover
            pass
        if fname in _TANH_FUNCS and len(node.args) == 1 and not node.keywords:
            x = self.ev(node.args[0], env)
            if x[0] == "logits":
                return ("logits", x[1], x[2] + (("tanh", 0.0),))
            return self.bad(node) if x[0] in _TRACKED else _UNKNOWN
        if fname == "slice_logits_to_keep" and node.args:
            x = self.ev(node.args[0], env)
            if x[0] == "hidden":
                return x
            return self.bad(node) if x[0] in _TRACKED else _UNKNOWN
        if fname == "getattr" and 2 <= len(node.args) <= 3 and isinstance(node.args[1], ast.Constant):
            o = self.ev(node.args[0], env)
            if o[0] == "obj" and isinstance(node.args[1].value, str):
                if hasattr(o[1].x, node.args[1].value):
                    return _scalar(getattr(o[1].x, node.args[1].value))
                return self.ev(node.args[2], env) if len(node.args) == 3 else _UNKNOWN
        if isinstance(func, ast.Attribute):
            recv = self.ev(func.value, env)
            if recv[0] in ("hidden", "logits"):
                meth = func.attr
                if meth in _PASSTHROUGH_METHODS:
                    if any(self.touches(a, env) for a in node.args) or any(
                        self.touches(k.value, env) for k in node.keywords
                    ):
                        return self.bad(node)
                    return recv
                if meth == "tanh" and recv[0] == "logits" and not node.args and not node.keywords:
                    return ("logits", recv[1], recv[2] + (("tanh", 0.0),))
                if meth in ("mul", "div") and len(node.args) == 1 and not node.keywords:
                    x = self.ev(node.args[0], env)
                    if x[0] == "num":
                        return self._op(recv, meth, x[1], node)
                return self.bad(node)
            if recv[0] == "obj" and func.attr == "get_text_config" and not node.args and not node.keywords:
                try:
                    return ("obj", _Ref(recv[1].x.get_text_config()))
                except Exception:
                    return _UNKNOWN
        return self.bad(node) if self.touches(node, env) else _UNKNOWN

    # -- conditions ---------------------------------------------------------------------------
    def cond(self, node, env):
        """True / False / None (unknown)."""
        if isinstance(node, ast.BoolOp):
            vals = [self.cond(v, env) for v in node.values]
            if isinstance(node.op, ast.And):
                return False if False in vals else (True if all(v is True for v in vals) else None)
            return True if True in vals else (False if all(v is False for v in vals) else None)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            c = self.cond(node.operand, env)
            return None if c is None else not c
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left = self.ev(node.left, env)
            right = self.ev(node.comparators[0], env)
            op = node.ops[0]
            if isinstance(op, (ast.Is, ast.IsNot)) and right == ("num", None):
                if left[0] == "num":
                    res = left[1] is None
                elif left[0] in ("obj", "body", "hidden", "logits"):
                    res = False
                else:
                    return None
                return res if isinstance(op, ast.Is) else not res
            if type(op) in _CMP and left[0] == "num" and right[0] == "num":
                try:
                    return bool(_CMP[type(op)](left[1], right[1]))
                except TypeError:
                    return None
            return None
        v = self.ev(node, env)
        if v[0] == "num":
            return bool(v[1])
        return None

    # -- statements ---------------------------------------------------------------------------
    def assign(self, target, value: tuple, env: dict) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.assign(elt, self.bad(target) if value[0] in _TRACKED else _UNKNOWN, env)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, value, env)
        else:  # subscript/attribute store mutates its base object
            base = target
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name) and env.get(base.id, _UNKNOWN)[0] in _TRACKED:
                env[base.id] = self.bad(target)

    def run(self, stmts, env: dict) -> None:
        for st in stmts:
            self.stmt(st, env)

    def branches(self, bodies, env: dict) -> None:
        """Run alternative bodies on copies of ``env`` and merge (disagreeing values are unknown)."""
        envs = []
        for body in bodies:
            e = dict(env)
            self.run(body, e)
            envs.append(e)
        keys = set().union(*envs)
        for k in keys:
            vals = [e.get(k, _UNKNOWN) for e in envs]
            if all(v == vals[0] for v in vals):
                env[k] = vals[0]
            elif any(v[0] in _TRACKED for v in vals):
                env[k] = next(v for v in vals if v[0] == "bad") if any(v[0] == "bad" for v in vals) else (
                    "bad", f"`{k}` differs between branches of a condition that cannot be evaluated"
                )
            else:
                env[k] = _UNKNOWN

    def stmt(self, st, env: dict) -> None:
        if isinstance(st, ast.Assign):
            v = self.ev(st.value, env)
            for t in st.targets:
                self.assign(t, v, env)
        elif isinstance(st, ast.AnnAssign):
            if st.value is not None:
                self.assign(st.target, self.ev(st.value, env), env)
        elif isinstance(st, ast.AugAssign):
            if isinstance(st.target, ast.Name):
                fake = ast.BinOp(left=ast.Name(id=st.target.id, ctx=ast.Load()), op=st.op, right=st.value)
                ast.copy_location(fake, st)
                self.assign(st.target, self.ev(fake, env), env)
            else:
                self.assign(st.target, _UNKNOWN, env)
        elif isinstance(st, ast.Expr):
            self.ev(st.value, env)
            call = st.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                base = call.func.value
                if (
                    isinstance(base, ast.Name)
                    and env.get(base.id, _UNKNOWN)[0] in _TRACKED
                    and call.func.attr.endswith("_")
                ):
                    env[base.id] = self.bad(call)
        elif isinstance(st, ast.If):
            c = self.cond(st.test, env)
            if c is True:
                self.run(st.body, env)
            elif c is False:
                self.run(st.orelse, env)
            else:
                self.branches([st.body, st.orelse], env)
        elif isinstance(st, ast.Return):
            if isinstance(st.value, ast.Call):
                for kw in st.value.keywords:
                    if kw.arg == "logits":
                        self.returns.append(self.ev(kw.value, env))
        elif isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
            self.branches([st.body + st.orelse, []], env)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            self.run(st.body, env)
        elif isinstance(st, ast.Try) or type(st).__name__ == "TryStar":
            self.branches([st.body + st.orelse] + [h.body for h in st.handlers] + [[]], env)
            self.run(st.finalbody, env)
        # other statements (pass, raise, assert, import, nested defs, ...) do not touch logits


def _analyze(model: nn.Module, heads: tuple[nn.Module, ...]) -> _Analysis:
    """Symbolically execute ``type(model).forward`` (see the comment block above)."""
    func = type(model).forward
    if "forward" in model.__dict__:  # patched on the instance (e.g. accelerate device hooks)
        old = model.__dict__.get("_old_forward")
        if old is None:
            return _Analysis(None, None, False, "model.forward is patched on the instance")
        func = getattr(old, "__func__", old)
    func = inspect.unwrap(func)
    tree = _forward_ast(func)
    if tree is None:
        return _Analysis(None, None, False, f"cannot read the source of {type(model).__name__}.forward")
    try:
        body = _decoder_body(model)
    except ValueError as e:
        return _Analysis(None, None, False, str(e))
    interp = _Interp(model, heads, body)
    try:
        interp.run(tree.body, {})
    except RecursionError:  # pragma: no cover
        return _Analysis(None, None, False, "forward too complex to analyse")
    name = type(model).__name__
    if not interp.returns:
        return _Analysis(None, None, False, f"{name}.forward: no `return ...(logits=...)` found")
    vals = []
    for v in interp.returns:
        if v not in vals:
            vals.append(v)
    for v in vals:
        if v[0] == "bad":
            return _Analysis(
                None, None, False,
                f"{name}.forward computes logits in a way streaming cannot reproduce "
                f"(only head(decoder output) with scalar scale / tanh softcap is supported): `{v[1]}`",
            )
        if v[0] != "logits":
            return _Analysis(
                None, None, False, f"{name}.forward: returned logits are not the output head applied to the body output"
            )
    if len(vals) != 1:
        return _Analysis(None, None, False, f"{name}.forward returns differently computed logits on different paths")
    _, hops, lops = vals[0]

    def apply(acc: float, op: str, x: float) -> float:
        if x == 0 or not math.isfinite(x):
            raise ValueError(f"non-finite or zero logit factor {x}")
        return acc * x if op == "mul" else acc / x

    try:
        hscale = 1.0
        for op, x in hops:
            hscale = apply(hscale, op, x)
        a, b, n_tanh = 1.0, 1.0, 0
        for op, x in lops:
            if op == "tanh":
                n_tanh += 1
            elif n_tanh == 0:
                a = apply(a, op, x)
            else:
                b = apply(b, op, x)
    except ValueError as e:
        return _Analysis(None, None, False, f"{name}.forward: {e}")
    if n_tanh > 1:
        return _Analysis(None, None, False, f"{name}.forward applies tanh to logits more than once")
    if n_tanh == 1:
        if b <= 0:
            return _Analysis(None, None, False, f"{name}.forward: unsupported tanh logit transform (factor {b})")
        scale, softcap = hscale * a * b, b  # b * tanh(a * raw) == c * tanh(scale * raw / c), c = b
    else:
        scale, softcap = hscale * a, None
    if abs(scale - 1.0) <= 1e-12:
        scale = None
    return _Analysis(scale, softcap, hscale != 1.0, None)


def _static_check(model: nn.Module) -> tuple[StreamingHead | None, str | None]:
    reason = _prompt_learning_reason(model)
    if reason is not None:
        return None, reason
    base = _unwrap(model)
    head, reason = _head_module(base)
    if head is None:
        return None, reason
    if base._forward_hooks or base._forward_pre_hooks:
        return None, f"{type(base).__name__} has forward hooks that forward_hidden would bypass"
    an = _analyze(base, (base.get_output_embeddings(), head))
    if an.reason is not None:
        return None, an.reason
    if an.hidden_scaled and head.bias is not None:
        return None, "hidden states are scaled before a head with bias (not a pure logit scale)"
    return StreamingHead(head.weight, head.bias, an.scale, an.softcap), None


def _probe(model: nn.Module, spec: StreamingHead, seq_len: int = 8) -> str | None:
    """Compare ``model(...).logits`` with the streamed formula on a short sequence (eval mode)."""
    base = _unwrap(model)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    device = emb.weight.device if emb is not None and hasattr(emb, "weight") else spec.weight.device
    vocab = spec.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
    attn = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            hidden = forward_hidden(model, ids, attn)
            if ref.shape != (*hidden.shape[:2], vocab):
                return f"probe: model logits have shape {tuple(ref.shape)}, head gives vocab {vocab}"
            z, _ = _chunk_logits(
                hidden[0].to(_compute_dtype(hidden, spec.weight)),
                spec.weight.to(_compute_dtype(hidden, spec.weight)),
                None if spec.bias is None else spec.bias.to(_compute_dtype(hidden, spec.weight)),
                spec.scale,
                spec.softcap,
            )
            a = torch.log_softmax(ref[0].float(), dim=-1)
            b = torch.log_softmax(z, dim=-1)
            err = (a - b).abs().max().item()
            half = ref.dtype in (torch.float16, torch.bfloat16) or hidden.dtype in (torch.float16, torch.bfloat16)
            tol = (2.0**-5 if half else 1e-4) * (1.0 + ref.float().abs().max().item())
            if not math.isfinite(err) or err > tol:
                return f"probe: streamed log-probs differ from model(...).logits by {err:.3g} (tol {tol:.3g})"
    finally:
        model.train(was_training)
    return None


def streaming_unsupported_reason(
    model: nn.Module, probe: bool = False, allow_transform: bool = False
) -> str | None:
    """``None`` if streaming reproduces ``model(...).logits``' log-probabilities, else a reason.

    Reasons (callers then fall back to full logits): no or non-Linear output head (incl.
    LoRA-adapted / quantised / hooked heads), peft prompt learning, or logit post-processing
    other than a scalar scale and/or a tanh softcap (vocabulary slicing, learnable scales,
    extra modules, ...).

    Scalar scales (Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
    ``lm_head_multiplier``, MiniCPM3 hidden scaling, ...) and softcaps (Gemma 2/3
    ``final_logit_softcapping``, RecurrentGemma ``logits_soft_cap``, ...) can be streamed, but
    only if the caller passes them on as ``scale=``/``softcap=`` (from ``streaming_head`` or
    ``logit_transform``; ``model_token_logprobs`` does). Because a caller that only uses
    ``output_head`` would silently drop them, such models get a reason unless
    ``allow_transform=True``.

    ``probe=True`` additionally runs the model once on an 8-token input (eval mode, no grad)
    and compares against the streamed formula: a cheap end-to-end guard worth running once at
    setup for architectures not covered by the tests.
    """
    spec, reason = _static_check(model)
    if reason is not None:
        return reason
    if not allow_transform and (spec.scale is not None or spec.softcap is not None):
        return (
            f"{type(_unwrap(model)).__name__} post-processes logits with scale={spec.scale}, "
            f"softcap={spec.softcap}: supported only if passed to streamed_token_logprobs "
            "(use streaming_head(model) / logit_transform(model), then "
            "streaming_unsupported_reason(model, allow_transform=True))"
        )
    if probe:
        return _probe(model, spec)
    return None


def streaming_head(model: nn.Module) -> StreamingHead:
    """``StreamingHead(weight, bias, scale, softcap)``; ``ValueError`` if streaming is unsupported."""
    spec, reason = _static_check(model)
    if reason is not None:
        raise ValueError(f"streaming unsupported: {reason}")
    return spec


def logit_transform(model: nn.Module) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` the model applies after the head (``None`` = not applied).

    ``model(...).logits == softcap * tanh(scale * (h @ W^T + b) / softcap)``. Raises
    ``ValueError`` when the post-processing is not of that form.
    """
    spec = streaming_head(model)
    return spec.scale, spec.softcap


def model_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    streaming: bool | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, mask)`` for a causal LM on a batch; ``labels`` ALIGNED with ``input_ids``.

    ``labels[:, t]`` is the target predicted at position ``t`` (i.e. usually ``input_ids[:, t+1]``),
    ``ignore_index`` elsewhere. ``streaming``: ``True`` (raise if unsupported), ``False`` (full
    logits via ``model(...).logits``) or ``"auto"`` (streamed when supported, else full logits).
    """
    if streaming not in (True, False, "auto"):
        raise ValueError(f"streaming must be True, False or 'auto', got {streaming!r}")
    if streaming is not False:
        spec, reason = _static_check(model)
        if reason is None:
            hidden = forward_hidden(model, input_ids, attention_mask)
            return streamed_token_logprobs(
                hidden, spec.weight, labels, ignore_index=ignore_index, chunk_size=chunk_size,
                bias=spec.bias, scale=spec.scale, softcap=spec.softcap,
            )
        if streaming is True:
            raise ValueError(f"streaming unsupported: {reason}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return naive_token_logprobs(logits, labels, ignore_index=ignore_index)
