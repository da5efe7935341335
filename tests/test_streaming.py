"""Streamed log p (bnll_lightning.streaming) against full-logits references.

Everything is float32 unless stated; references use plain autograd over materialised logits.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnll_lightning import streaming
from bnll_lightning.logp_head import StreamingArgs
from bnll_lightning.streaming import (
    forward_hidden,
    head_logits,
    output_head,
    streamed_eval_logprobs,
    streamed_token_logprobs,
    streaming_head,
    streaming_unsupported_reason,
)

IGN = -100
V, H = 53, 16


# ------------------------------------------------------------------------------ helpers


def naive_token_logprobs(logits, labels, ignore_index=IGN):
    """The reference: float32 log_softmax over full logits, gathered at the target (0 off the mask)."""
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.masked_fill(~mask, 0)[..., None])
    return logp[..., 0].masked_fill(~mask, 0.0), mask


def model_token_logprobs(model, input_ids, labels, attention_mask=None, *, chunk_size=1024, streaming="auto"):
    """(logp, mask) of a causal LM: streamed (True), full logits (False) or as the check decides ("auto")."""
    if streaming == "auto":
        streaming = streaming_unsupported_reason(model) is None
    if streaming:
        head = streaming_head(model)
        hidden = forward_hidden(model, input_ids, attention_mask)
        return streamed_token_logprobs(hidden, head.weight, labels, IGN, chunk_size,
                                       bias=head.bias, scale=head.scale, softcap=head.softcap)
    return naive_token_logprobs(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


def make_batch(b=3, t=11, vocab=V, hdim=H, seed=0, dtype=torch.float32, with_bias=False):
    """Hidden, weight, (bias), labels with a prompt-like prefix and right padding per row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, hdim, generator=g).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(vocab, generator=g) * 0.3).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (b, t), generator=g)
    for i in range(b):
        prompt = (2 * i + 1) % t
        pad = i % 3
        labels[i, :prompt] = IGN
        if pad:
            labels[i, t - pad :] = IGN
    labels[0, 0] = 0  # vocabulary index 0 as a target next to ignored positions
    return hidden, weight, bias, labels


def naive_from_parts(hidden, weight, labels, bias=None, scale=None, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return naive_token_logprobs(logits, labels, ignore_index=IGN)


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(fn, upstream, *ts):
    """Forward with fresh leaves, backward (logp * upstream).sum(); return (logp, mask, grads)."""
    ls = leaves(*ts)
    logp, mask = fn(*ls)
    (logp * upstream).sum().backward()
    return logp.detach(), mask, [None if t is None else t.grad for t in ls]


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ core function


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024, None])  # None: larger than N
def test_streamed_matches_naive_values_and_grads(chunk_size, with_bias):
    hidden, weight, bias, labels = make_batch(with_bias=with_bias)
    n = int((labels != IGN).sum())
    cs = n + 5 if chunk_size is None else chunk_size
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))

    lp_n, m_n, g_n = grads_of(lambda h, w, b: naive_from_parts(h, w, labels, b), upstream, hidden, weight, bias)
    lp_s, m_s, g_s = grads_of(
        lambda h, w, b: streamed_token_logprobs(h, w, labels, ignore_index=IGN, chunk_size=cs, bias=b),
        upstream, hidden, weight, bias,
    )
    assert lp_s.dtype == torch.float32 and lp_s.shape == labels.shape
    assert m_s.dtype == torch.bool and torch.equal(m_s, m_n) and torch.equal(m_s, labels != IGN)
    assert torch.all(lp_s[~m_s] == 0)
    assert torch.all(lp_s[m_s] < 0)
    assert_close(lp_s, lp_n)
    for gs, gn in zip(g_s, g_n):
        if gn is None:
            assert gs is None
            continue
        assert gs.dtype == gn.dtype
        assert_close(gs, gn)
    # hidden gradient is exactly zero where there is no target
    assert torch.all(g_s[0][~m_s] == 0)


@pytest.mark.parametrize("scale,softcap", [(0.0625, None), (1 / 3.0, None), (None, 2.5), (1.7, 3.0)])
@pytest.mark.parametrize("chunk_size", [1, 5])
def test_scale_and_softcap_match_naive(scale, softcap, chunk_size):
    hidden, weight, bias, labels = make_batch(with_bias=True, seed=3)
    hidden = hidden * 3  # large logits so the softcap actually bends them
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    lp_n, _, g_n = grads_of(
        lambda h, w, b: naive_from_parts(h, w, labels, b, scale=scale, softcap=softcap), upstream, hidden, weight, bias
    )
    lp_s, _, g_s = grads_of(
        lambda h, w, b: streamed_token_logprobs(
            h, w, labels, chunk_size=chunk_size, bias=b, scale=scale, softcap=softcap
        ),
        upstream, hidden, weight, bias,
    )
    assert_close(lp_s, lp_n)
    for gs, gn in zip(g_s, g_n):
        assert_close(gs, gn)


def test_bf16_inputs_within_bf16_tolerance_and_float32_output():
    hidden32, weight32, _, labels = make_batch(seed=5)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(6))
    hidden16, weight16 = hidden32.bfloat16(), weight32.bfloat16()

    lp_ref, _, (gh_ref, gw_ref) = grads_of(
        lambda h, w: naive_from_parts(h, w, labels), upstream, hidden16.float(), weight16.float()
    )
    lp_s, _, (gh_s, gw_s) = grads_of(
        lambda h, w: streamed_token_logprobs(h, w, labels, chunk_size=4), upstream, hidden16, weight16
    )
    assert lp_s.dtype == torch.float32
    assert gh_s.dtype == torch.bfloat16 and gw_s.dtype == torch.bfloat16
    scale = lp_ref.abs().max()
    assert (lp_s - lp_ref).abs().max() <= 0.02 * scale
    for gs, gr in ((gh_s, gh_ref), (gw_s, gw_ref)):
        assert torch.isfinite(gs).all()
        assert (gs.float() - gr).abs().max() <= 0.03 * gr.abs().max()

    # Same arithmetic as the bf16 naive path (bf16 matmul, float32 after): much closer.
    lp_n16, _, (gh_n16, gw_n16) = grads_of(lambda h, w: naive_from_parts(h, w, labels), upstream, hidden16, weight16)
    assert_close(lp_s, lp_n16, rtol=1e-5, atol=1e-5)
    assert_close(gh_s.float(), gh_n16.float(), rtol=2e-2, atol=2e-3)
    assert_close(gw_s.float(), gw_n16.float(), rtol=2e-2, atol=2e-3)


def test_autocast_uses_autocast_dtype_for_the_matmul():
    hidden, weight, _, labels = make_batch(seed=7)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_n, _, (gh_n, gw_n) = grads_of(lambda h, w: naive_from_parts(h, w, labels), upstream, hidden, weight)
        lp_s, _, (gh_s, gw_s) = grads_of(
            lambda h, w: streamed_token_logprobs(h, w, labels, chunk_size=3), upstream, hidden, weight
        )
    assert lp_s.dtype == torch.float32 and gh_s.dtype == torch.float32 and gw_s.dtype == torch.float32
    assert_close(lp_s, lp_n, rtol=1e-5, atol=1e-5)
    lp_fp32, _ = naive_from_parts(hidden, weight, labels)
    assert (lp_s - lp_fp32).abs().max() > 1e-6  # the matmul really ran in bf16
    assert_close(gh_s, gh_n, rtol=2e-2, atol=2e-3)
    assert_close(gw_s, gw_n, rtol=2e-2, atol=2e-3)


def test_float32_head_under_autocast_matches_the_float32_reference():
    hidden, weight, _, labels = make_batch(seed=7)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(8))
    lp_ref, _, (gh_ref, gw_ref) = grads_of(lambda h, w: naive_from_parts(h, w, labels), upstream, hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _, (gh, gw) = grads_of(
            lambda h, w: streamed_token_logprobs(h, w, labels, chunk_size=3, head_dtype=torch.float32),
            upstream, hidden, weight,
        )
        bf16, _ = streamed_token_logprobs(hidden, weight, labels, chunk_size=3)
    assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    assert (bf16 - lp_ref).abs().max() > 100 * (lp - lp_ref).abs().max()  # the default head rounds in bf16


def test_module_head_float32_option(tiny_model_dir):
    from bnll_lightning.module import SFTModule

    batch = {"input_ids": torch.tensor([[1, 5, 9, 4, 7, 2]]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 9, 4, 7, 2]])}
    exact = SFTModule(model=tiny_model_dir, streaming=StreamingArgs(streamed=False))
    ref, mask = exact.target_logprobs(batch)
    errors = {}
    for float32 in (False, True):
        module = SFTModule(model=tiny_model_dir, streaming=StreamingArgs(head_float32=float32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, _ = module.target_logprobs(batch)
            eval_logp, _, _ = module.head.eval(module.model, batch)
        # The decoder body runs in bf16 either way: compare against the same body with a float32 head.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = streaming.forward_hidden(module.model, batch["input_ids"], batch["attention_mask"])
        weight, _ = streaming.output_head(module.model)
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        reference, _ = naive_from_parts(hidden.float(), weight.float(), labels)
        errors[float32] = (logp - reference)[mask].abs().max().item()
        assert_close(eval_logp, logp, rtol=1e-6, atol=1e-6)  # validation reads log p as training does
    assert errors[True] < 1e-5 < errors[False]
    assert ref.dtype == torch.float32


def test_all_masked_gives_zeros_and_finite_zero_grads():
    hidden, weight, bias, labels = make_batch(with_bias=True)
    labels = torch.full_like(labels, IGN)
    h, w, b = leaves(hidden, weight, bias)
    logp, mask = streamed_token_logprobs(h, w, labels, bias=b, chunk_size=4)
    assert not mask.any()
    assert logp.dtype == torch.float32 and torch.equal(logp, torch.zeros_like(logp))
    loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
    loss.backward()
    for t in (h, w, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and torch.all(t.grad == 0)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("zeros", ["some", "all"])
def test_rows_with_zero_upstream_gradient_are_skipped_exactly(chunk_size, zeros):
    """Tokens an objective does not train on (upstream gradient exactly 0) are skipped in backward;
    the gradients still equal the full computation, and are zero tensors (not None) when no token counts."""
    hidden, weight, bias, labels = make_batch(with_bias=True, seed=13)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(14))
    if zeros == "all":
        upstream.zero_()
    else:
        upstream[:, ::2] = 0.0
        upstream[1] = 0.0
    _, _, g_n = grads_of(lambda h, w, b: naive_from_parts(h, w, labels, b), upstream, hidden, weight, bias)
    _, _, g_s = grads_of(
        lambda h, w, b: streamed_token_logprobs(h, w, labels, chunk_size=chunk_size, bias=b), upstream, hidden, weight, bias
    )
    for gs, gn in zip(g_s, g_n):
        assert gs is not None and gs.shape == gn.shape
        assert_close(gs, gn)
    assert torch.all(g_s[0][upstream == 0] == 0)
    assert (zeros == "all") == bool(torch.all(g_s[1] == 0))

    # half-precision matmuls with float32 accumulation over several chunks take the same shortcut
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, g_n16 = grads_of(lambda h, w, b: naive_from_parts(h, w, labels, b), upstream, hidden, weight, bias)
        _, _, g_s16 = grads_of(
            lambda h, w, b: streamed_token_logprobs(h, w, labels, chunk_size=chunk_size, bias=b),
            upstream, hidden, weight, bias,
        )
    for gs, gn in zip(g_s16, g_n16):
        assert gs.dtype == torch.float32
        assert_close(gs, gn, rtol=2e-2, atol=2e-3)


def test_frozen_weight_and_hidden_without_grad():
    hidden, weight, bias, labels = make_batch(with_bias=True, seed=9)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(10))
    _, _, (gh_n, _, _) = grads_of(lambda h, w, b: naive_from_parts(h, w, labels, b), upstream, hidden, weight, bias)

    # frozen head (e.g. LoRA): only hidden needs a gradient
    h = hidden.clone().requires_grad_(True)
    w, b = weight.clone(), bias.clone()
    logp, _ = streamed_token_logprobs(h, w, labels, bias=b, chunk_size=6)
    (logp * upstream).sum().backward()
    assert w.grad is None and b.grad is None
    assert_close(h.grad, gh_n)

    # hidden without grad, trainable weight
    _, _, (_, gw_n, gb_n) = grads_of(lambda h, w, b: naive_from_parts(h, w, labels, b), upstream, hidden, weight, bias)
    w, b = leaves(weight, bias)
    logp, _ = streamed_token_logprobs(hidden, w, labels, bias=b, chunk_size=6)
    (logp * upstream).sum().backward()
    assert_close(w.grad, gw_n)
    assert_close(b.grad, gb_n)

    # nothing needs a gradient: plain tensor out
    logp, _ = streamed_token_logprobs(hidden, weight, labels)
    assert not logp.requires_grad


def test_non_contiguous_hidden_and_int32_labels():
    hidden, weight, _, labels = make_batch(seed=11)
    hidden_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not hidden_nc.is_contiguous()
    lp_s, _ = streamed_token_logprobs(hidden_nc, weight, labels.int(), chunk_size=5)
    lp_n, _ = naive_from_parts(hidden, weight, labels)
    assert_close(lp_s, lp_n)


def test_only_chunk_sized_tensors_are_saved_for_backward():
    """Genuinely O(chunk * V): nothing of size N * V is kept between forward and backward."""
    vocab, hdim = 4000, 8
    hidden, weight, _, labels = make_batch(b=4, t=64, vocab=vocab, hdim=hdim, seed=12)
    n = int((labels != IGN).sum())
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    h, w = leaves(hidden, weight)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = streamed_token_logprobs(h, w, labels, chunk_size=16)
    assert max(saved) <= vocab * hdim  # the weight itself; never logits
    assert max(saved) < n * vocab / 4
    logp.sum().backward()
    assert torch.isfinite(w.grad).all()

    saved.clear()
    h, w = leaves(hidden, weight)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_from_parts(h, w, labels)
    assert max(saved) >= labels.numel() * vocab  # the reference does keep [B, T, V]


def test_naive_token_logprobs_contract():
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[1, IGN, 6, 0], [IGN, IGN, 3, IGN]])
    logp, mask = naive_token_logprobs(logits, labels)
    assert logp.dtype == torch.float32 and torch.equal(mask, labels != IGN)
    ref = torch.log_softmax(logits.float(), -1)
    assert logp[0, 0] == ref[0, 0, 1] and logp[1, 2] == ref[1, 2, 3]
    assert torch.all(logp[~mask] == 0)


def test_argument_validation():
    hidden, weight, _, labels = make_batch()
    with pytest.raises(ValueError):
        streamed_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError):
        streamed_token_logprobs(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError):
        streamed_token_logprobs(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError):
        streamed_token_logprobs(hidden, weight, labels, softcap=0.0)


# ------------------------------------------------------------------------------ models

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tie, **TINY))
    if not tie:  # make the head clearly different from the embedding
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.05)
    return model


def enable_checkpointing(model):
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else True


def lm_batch(vocab=1000, b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    attn = torch.ones_like(ids)
    attn[1, -2:] = 0  # right padding
    attn[2, -4:] = 0
    labels = torch.full_like(ids, IGN)
    labels[:, :-1] = ids[:, 1:]  # aligned: position t predicts token t+1
    labels[:, :3] = IGN  # prompt
    labels[attn == 0] = IGN
    labels[:, :-1][attn[:, 1:] == 0] = IGN
    return ids, attn, labels


def loss_and_grads(model, ids, attn, labels, streaming, chunk_size=5):
    model.zero_grad(set_to_none=True)
    logp, mask = model_token_logprobs(model, ids, labels, attn, chunk_size=chunk_size, streaming=streaming)
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logp.detach(), grads


def assert_model_paths_agree(model, ids, attn, labels, rtol=1e-4, atol=1e-6):
    loss_n, lp_n, g_n = loss_and_grads(model, ids, attn, labels, streaming=False)
    loss_s, lp_s, g_s = loss_and_grads(model, ids, attn, labels, streaming=True)
    assert_close(lp_s, lp_n, rtol=1e-5, atol=1e-5)
    assert_close(loss_s, loss_n, rtol=1e-5, atol=1e-6)
    assert g_s.keys() == g_n.keys() and len(g_s) > 0
    for name in g_n:
        assert_close(g_s[name], g_n[name], rtol=rtol, atol=atol)
    return g_s


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_streamed_equals_full_logits(tie):
    model = tiny_llama(tie)
    assert streaming_unsupported_reason(model, check=False) is None
    assert streaming_unsupported_reason(model) is None
    assert streaming_head(model)[1:] == (None, None, None)  # no bias, no post-processing
    weight, bias = output_head(model)
    assert bias is None
    assert (weight is model.get_input_embeddings().weight) == tie
    ids, attn, labels = lm_batch()
    grads = assert_model_paths_agree(model, ids, attn, labels)
    assert "model.embed_tokens.weight" in grads
    assert ("lm_head.weight" in grads) == (not tie)

    # forward_hidden + head == model(...).logits
    with torch.no_grad():
        hidden = forward_hidden(model, ids, attn)
        assert hidden.shape == (*ids.shape, TINY["hidden_size"])
        assert_close(F.linear(hidden, weight), model(input_ids=ids, attention_mask=attn).logits)


def _every_objective(tau):
    from bnll_lightning.objectives import DFT, NLL, AlphaFamily, Focal, NegProb, ThresholdedNLL, TopFraction

    return {
        "nll": NLL(), "negprob": NegProb(), "alpha0.5": AlphaFamily(0.5), "alpha10": AlphaFamily(10.0),
        "thresholded": ThresholdedNLL(tau), "top0.3": TopFraction(0.3), "dft": DFT(), "focal2": Focal(2.0),
    }


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", list(_every_objective(0.5)))
def test_every_objective_streamed_equals_full_logits(name, tie, chunk_size):
    """Loss and every parameter's gradient (head and body: the logits side and the weight side),
    streamed vs full logits, for each objective, with prompt and padding masks."""
    model = tiny_llama(tie, seed=5)
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)  # sharpen the random model so p spreads over (0, 1)
    ids, attn, labels = lm_batch(seed=5)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        likely = (labels != IGN) & (torch.arange(labels.numel()).view(labels.shape) % 2 == 0)
        labels = torch.where(likely, logits.argmax(-1), labels)  # half the targets are the model's own guess
        p, mask = naive_token_logprobs(logits, labels, IGN)
        p = p.exp()[mask]
    assert p.max() > 0.3 and p.min() < 0.01  # a real spread, so every objective weights tokens differently
    mid = p.sort().values[p.numel() // 2 - 1 : p.numel() // 2 + 1]
    tau = float(mid.mean())  # ThresholdedNLL keeps half of the tokens; no p sits on the threshold

    def run(streaming):
        model.zero_grad(set_to_none=True)
        logp, m = model_token_logprobs(model, ids, labels, attn, chunk_size=chunk_size, streaming=streaming)
        out = _every_objective(tau)[name].from_logprobs(logp, m)
        out.loss.backward()
        return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    out_n, g_n = run(False)
    out_s, g_s = run(True)
    assert_close(out_s.loss, out_n.loss, rtol=1e-5, atol=1e-7)
    assert torch.equal(out_s.selected, out_n.selected)
    assert g_s.keys() == g_n.keys() and ("lm_head.weight" in g_s) == (not tie)
    for n in g_n:
        scale = g_n[n].abs().max()
        assert scale > 0 or n.endswith("norm.weight"), n  # a comparison of zeros would test nothing
        assert_close(g_s[n] / scale.clamp_min(1e-30), g_n[n] / scale.clamp_min(1e-30), rtol=1e-4, atol=1e-5)


def test_tiny_llama_gradient_checkpointing():
    model = tiny_llama(False, seed=1)
    enable_checkpointing(model)
    model.train()
    assert streaming_unsupported_reason(model) is None
    ids, attn, labels = lm_batch(seed=1)
    assert_model_paths_agree(model, ids, attn, labels)


def test_peft_lora_forward_hidden_and_grads():
    peft = pytest.importorskip("peft")
    model = tiny_llama(False, seed=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    assert streaming_unsupported_reason(pm, check=True) is None
    weight, _ = output_head(pm)
    assert weight is model.lm_head.weight and not weight.requires_grad  # frozen head
    ids, attn, labels = lm_batch(seed=2)
    with torch.no_grad():
        hidden = forward_hidden(pm, ids, attn)
        with pm.disable_adapter():
            hidden_base = forward_hidden(pm, ids, attn)
        assert (hidden - hidden_base).abs().max() > 1e-4  # LoRA layers were used
        assert_close(F.linear(hidden, weight), pm(input_ids=ids, attention_mask=attn).logits)
    grads = assert_model_paths_agree(pm, ids, attn, labels)
    assert grads and all("lora_" in n for n in grads)

    # ...also under gradient checkpointing with frozen embeddings
    enable_checkpointing(pm)
    pm.enable_input_require_grads()
    pm.train()
    assert_model_paths_agree(pm, ids, attn, labels)


def test_peft_head_wrappers():
    peft = pytest.importorskip("peft")
    # modules_to_save: the trainable copy of the head is the one used
    pm = peft.get_peft_model(
        tiny_llama(False, seed=3),
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    weight, _ = output_head(pm)
    assert weight is pm.base_model.model.lm_head.modules_to_save["default"].weight and weight.requires_grad
    with torch.no_grad():
        weight.mul_(1.5)  # make the copy differ from the original head
    assert streaming_unsupported_reason(pm, check=True) is None
    ids, attn, labels = lm_batch(seed=3)
    grads = assert_model_paths_agree(pm, ids, attn, labels)
    assert any("modules_to_save" in n for n in grads)

    # LoRA on the head itself: not a plain Linear -> fall back
    pm = peft.get_peft_model(tiny_llama(False, seed=3), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "nn.Linear" in streaming_unsupported_reason(pm)
    lp, mask = model_token_logprobs(pm, ids, labels, attn)  # "auto" falls back to full logits
    assert lp.shape == labels.shape
    with pytest.raises(ValueError):
        model_token_logprobs(pm, ids, labels, attn, streaming=True)

    # prompt learning adds virtual tokens: the body alone is not the model
    pm = peft.get_peft_model(
        tiny_llama(True, seed=3), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    assert "prompt" in streaming_unsupported_reason(pm)
    with pytest.raises(NotImplementedError):
        forward_hidden(pm, ids, attn)


# Model families whose forward post-processes logits with a scalar and/or tanh softcap.
def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a cap below the tiny model's logits (|z| < 0.5) so that it really bends them
    cfg = Gemma2Config(head_dim=8, final_logit_softcapping=0.2, query_pre_attn_scalar=8, **TINY)
    return Gemma2ForCausalLM(cfg), (None, 0.2)


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(logit_scale=0.5, **TINY)), (0.5, None)


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **TINY)), (0.25, None)


FAMILIES = pytest.mark.parametrize("build", [_gemma2, _cohere, _granite], ids=["gemma2", "cohere", "granite"])


def build_family(build, seed=4):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, transform = build()
    return model.float(), transform


@FAMILIES
def test_logit_postprocessing_families(build):
    model, (scale, softcap) = build_family(build)
    head = streaming_head(model)
    assert head.scale == pytest.approx(scale, rel=1e-12) if scale is not None else head.scale is None
    assert head.softcap == pytest.approx(softcap, rel=1e-12) if softcap is not None else head.softcap is None
    assert streaming_unsupported_reason(model) is None  # the check agrees with the table
    ids, attn, labels = lm_batch(seed=4)
    assert_model_paths_agree(model, ids, attn, labels)
    # the transform matters: without it the streamed numbers would be wrong
    with torch.no_grad():
        hidden = forward_hidden(model, ids, attn)
        plain, _ = streamed_token_logprobs(hidden, head.weight, labels)
        ref, _ = naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, labels)
    assert (plain - ref).abs().max() > 1e-2


@FAMILIES
def test_check_catches_a_transform_missing_from_the_table(build, monkeypatch):
    model, _ = build_family(build)
    monkeypatch.setattr(streaming, "LOGIT_CONFIG", {})
    assert streaming_head(model)[2:] == (None, None)
    assert streaming_unsupported_reason(model, check=False) is None  # structurally fine ...
    assert "check" in streaming_unsupported_reason(model)  # ... but not the model's numbers
    ids, attn, labels = lm_batch(seed=4)
    lp, _ = model_token_logprobs(model, ids, labels, attn)  # "auto" falls back to full logits
    ref, _ = naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, labels)
    assert torch.equal(lp, ref)


def test_check_passes_a_bf16_model_and_restores_training_modes():
    model, _ = build_family(_gemma2)
    model.to(torch.bfloat16).train()
    model.model.layers[0].eval()  # a submodule deliberately in eval mode
    assert streaming_unsupported_reason(model) is None  # bf16 rounding is not a difference
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


def test_head_logits_applies_scale_then_softcap():
    hidden, weight, bias, _ = make_batch(with_bias=True, seed=13)
    raw = F.linear(hidden, weight, bias)
    assert_close(head_logits(hidden, weight, bias), raw)
    assert_close(head_logits(hidden, weight, bias, scale=0.5, softcap=2.0), 2.0 * torch.tanh(0.5 * raw / 2.0))


def test_opt_style_model_calls_nested_decoder():
    """OPT's forward feeds ``self.model.decoder(...)`` to the head: forward_hidden follows it."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(7)
    model = OPTForCausalLM(OPTConfig(vocab_size=1000, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                     pad_token_id=1, dropout=0.0, attention_dropout=0.0))
    assert streaming_unsupported_reason(model, check=True) is None
    ids, attn, labels = lm_batch(seed=7)
    assert_model_paths_agree(model, ids, attn, labels)
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append("wrapper"))
    model.model.decoder.register_forward_hook(lambda *a: calls.append("decoder"))
    forward_hidden(model, ids, attn)
    assert calls == ["decoder"]  # exactly the module OPTForCausalLM.forward calls


def test_gemma2_without_softcapping_is_plain():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    model = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=None, query_pre_attn_scalar=8, **TINY))
    assert streaming_head(model)[2:] == (None, None)
    assert streaming_unsupported_reason(model) is None


# Custom post-processing that no table knows: each must be caught by the check against the logits.
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


class _VocabSlicingLM(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        logits = logits[..., :-10]
        return CausalLMOutputWithPast(logits=logits)


class _LearnableScaleLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) / self.temperature
        return CausalLMOutputWithPast(logits=logits)


class _ShiftedLM(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs[0])
        logits = torch.tanh(logits + self.lm_head.weight.sum())
        return CausalLMOutputWithPast(logits=logits)


class _MaskedTokenLM(LlamaForCausalLM):
    """Changes only a few vocabulary entries (e.g. suppressing special tokens)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        logits[..., :3] = -1e4
        return CausalLMOutputWithPast(logits=logits)


class _OddBodyLM(LlamaForCausalLM):
    """The head reads something other than the decoder body's output."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state + self.model.embed_tokens(input_ids))
        return CausalLMOutputWithPast(logits=logits)


@pytest.mark.parametrize("cls", [_VocabSlicingLM, _LearnableScaleLM, _ShiftedLM, _MaskedTokenLM, _OddBodyLM])
def test_unknown_postprocessing_falls_back(cls):
    from transformers import LlamaConfig

    torch.manual_seed(8)
    model = cls(LlamaConfig(**TINY))
    assert streaming_unsupported_reason(model, check=False) is None  # nothing structural to see ...
    assert "check" in streaming_unsupported_reason(model)  # ... the check against the logits catches it
    ids, attn, labels = lm_batch(vocab=990)  # targets inside the sliced vocabulary too
    lp, _ = model_token_logprobs(model, ids, labels, attn)  # auto: falls back to full logits
    ref, _ = naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, labels)
    assert torch.equal(lp, ref)


def test_hooks_and_missing_head_give_reason():
    model = tiny_llama(False)
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert "hook" in streaming_unsupported_reason(model)
    handle.remove()
    handle = model.register_forward_hook(lambda m, i, o: o)
    assert "hook" in streaming_unsupported_reason(model)
    handle.remove()
    assert streaming_unsupported_reason(model) is None
    model.lm_head = nn.Sequential(nn.Linear(32, 1000, bias=False))
    assert streaming_unsupported_reason(model) is not None
    with pytest.raises(ValueError):
        output_head(model)


# ------------------------------------------------------------------------------ SFTModule wiring


def test_sft_module_streams_gemma2_with_its_softcap(tmp_path, tokenizer):
    """The module decides once, keeps the softcap, and its train/eval numbers equal full logits."""
    import lightning.pytorch as L
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from bnll_lightning.module import SFTModule

    cfg = Gemma2Config(head_dim=8, final_logit_softcapping=0.2, query_pre_attn_scalar=8,
                       **{**TINY, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(9)
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="streamed log p is off")
        module = SFTModule(str(tmp_path / "gemma2"), export_dir=str(tmp_path / "export"),
                           streaming=StreamingArgs(chunk_size=4))
    assert module.head.streamed and (module.head.scale, module.head.softcap) == (None, 0.2)

    ids, attn, labels = lm_batch(vocab=len(tokenizer), seed=9)
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    module.eval()
    with torch.no_grad():
        streamed, (lp_eval, _, correct) = module.target_logprobs(batch), module.head.eval(module.model, batch)
        module.head.streamed = False
        full, (lp_eval_full, _, correct_full) = module.target_logprobs(batch), module.head.eval(module.model, batch)
        module.head.streamed = True
    assert_close(streamed[0], full[0], rtol=1e-5, atol=1e-5)
    assert_close(lp_eval, lp_eval_full, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, correct_full)

    before = module.model.lm_head.weight.detach().clone()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    module.train()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert module.head.streamed and math.isfinite(module.last_step_stats["loss_sum"])
    assert not torch.equal(module.model.lm_head.weight, before)  # it trained


# ------------------------------------------------------------------------------ statistics beyond log p

from bnll_lightning.objectives import ASFT, EAFT, StatsRequest, TokenAlpha, token_stats  # noqa: E402
from bnll_lightning.streaming import StreamingHead, streamed_token_stats  # noqa: E402


def _ref_parts(b=3, t=11, hdim=12, seed=9, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, hdim, generator=g)
    head = StreamingHead(torch.randn(V, hdim, generator=g) * 0.5,
                         torch.randn(V, generator=g) * 0.3 if with_bias else None, None, None)
    return hidden, head


def _stats_pair(hidden, weight, bias, labels, request, ref_hidden, ref_head, chunk_size, scale=None, softcap=None):
    """Streamed and full-logits TokenStats of the same leaves, with a backward through each."""
    out = []
    for streamed in (True, False):
        h, w, b = leaves(hidden, weight, bias)
        if streamed:
            s = streamed_token_stats(h, w, labels, IGN, chunk_size, b, scale, softcap, entropy=request.entropy,
                                     topk=request.topk, reference_hidden=ref_hidden if request.reference else None,
                                     reference_head=ref_head if request.reference else None, kl=request.kl)
        else:
            logits = F.linear(h, w, b).float()
            if scale is not None:
                logits = logits * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            r = head_logits(ref_hidden, ref_head.weight, ref_head.bias, ref_head.scale, ref_head.softcap)
            s = token_stats(logits, labels, request, IGN, ref_logits=r if request.reference else None)
        g = torch.Generator().manual_seed(3)
        loss = (s.logp * torch.randn(labels.shape, generator=g)).sum()
        if s.kl is not None:
            loss = loss + (s.kl * torch.rand(labels.shape, generator=g)).sum()
        loss.backward()
        out.append((s, [None if x is None else x.grad for x in (h, w, b)]))
    return out


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("transform", [(None, None), (0.7, None), (None, 3.0)], ids=["plain", "scale", "softcap"])
def test_streamed_stats_match_full_logits_values_and_grads(kl, chunk_size, transform):
    hidden, weight, bias, labels = make_batch(with_bias=True, seed=2)
    ref_hidden, ref_head = _ref_parts()
    ref_head = ref_head._replace(softcap=2.5)  # the reference's own post-processing is honoured too
    request = StatsRequest(entropy=True, topk=7, reference=True, kl=kl)
    (s, gs), (n, gn) = _stats_pair(hidden, weight, bias, labels, request, ref_hidden, ref_head, chunk_size, *transform)
    assert torch.equal(s.mask, n.mask)
    for field in ("logp", "entropy", "topk_entropy", "kl", "ref_logp"):
        a, b = getattr(s, field), getattr(n, field)
        assert a.dtype == torch.float32 and a.shape == labels.shape, field
        assert_close(a, b, rtol=1e-5, atol=2e-5)
        assert (a[~s.mask] == 0).all(), field
    assert s.kl[s.mask].abs().min() > 0 and not s.entropy.requires_grad and not s.ref_logp.requires_grad
    for a, b in zip(gs, gn):
        scale = b.abs().max()
        assert scale > 0
        assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5)


def test_streamed_stats_without_requests_is_the_log_p_path(monkeypatch):
    """Objectives that need only log p pay for log p alone: one head matmul per chunk in forward and one in
    backward, no entropy, top-k or reference work; the same numbers as ``streamed_token_logprobs``."""
    hidden, weight, _, labels = make_batch()
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return head_logits(*args, **kwargs)

    def no_entropy(logq):
        raise AssertionError("entropy computed for a log-p-only request")

    monkeypatch.setattr(streaming, "head_logits", counted)
    monkeypatch.setattr(streaming, "_entropy_of", no_entropy)
    h, w = leaves(hidden, weight)
    s = streamed_token_stats(h, w, labels, IGN, 4)
    n = int(s.mask.sum())
    assert sum(calls) == n and len(calls) == math.ceil(n / 4)  # the model's head only, each target once
    s.logp.sum().backward()
    assert sum(calls) == 2 * n  # backward recomputes each chunk once, no reference head
    logp, mask = streamed_token_logprobs(hidden, weight, labels, IGN, 4)
    assert torch.equal(s.logp, logp) and torch.equal(s.mask, mask)
    assert s.entropy is s.topk_entropy is s.kl is s.ref_logp is None


def test_streamed_stats_all_masked_and_grad_free_reference():
    hidden, weight, _, labels = make_batch()
    ref_hidden, ref_head = _ref_parts()
    labels = torch.full_like(labels, IGN)
    h, w = leaves(hidden, weight)
    ref_w = ref_head.weight.clone().requires_grad_(True)  # even a reference that asks for gradients gets none
    s = streamed_token_stats(h, w, labels, entropy=True, topk=3, reference_hidden=ref_hidden,
                             reference_head=ref_head._replace(weight=ref_w))
    assert all((t == 0).all() for t in (s.logp, s.entropy, s.topk_entropy, s.kl, s.ref_logp))
    (s.logp.sum() + s.kl.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all() and ref_w.grad is None


def test_streamed_stats_keep_only_chunk_sized_tensors_with_a_reference():
    vocab, hdim = 4000, 8
    hidden, weight, _, labels = make_batch(b=4, t=64, vocab=vocab, hdim=hdim, seed=12)
    ref_hidden = torch.randn(4, 64, 6)
    ref_head = StreamingHead(torch.randn(vocab, 6), None, None, None)
    n = int((labels != IGN).sum())
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    h, w = leaves(hidden, weight)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = streamed_token_stats(h, w, labels, chunk_size=16, entropy=True, topk=20, reference_hidden=ref_hidden,
                                 reference_head=ref_head)
    assert max(saved) <= vocab * hdim and max(saved) < n * vocab / 4  # weights at most; never logits
    (s.logp.sum() + s.kl.sum()).backward()
    assert torch.isfinite(w.grad).all()


def test_streamed_stats_float32_under_bf16_autocast():
    hidden, weight, _, labels = make_batch(seed=4)
    ref_hidden, ref_head = _ref_parts(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = streamed_token_stats(hidden, weight, labels, entropy=True, reference_hidden=ref_hidden,
                                 reference_head=ref_head)
    n = token_stats(F.linear(hidden.bfloat16(), weight.bfloat16()).float(), labels,
                    StatsRequest(entropy=True, reference=True),
                    ref_logits=F.linear(ref_hidden.bfloat16(), ref_head.weight.bfloat16(), ref_head.bias.bfloat16()))
    assert s.logp.dtype == s.kl.dtype == s.entropy.dtype == torch.float32
    for field in ("logp", "entropy", "kl"):
        assert_close(getattr(s, field), getattr(n, field), rtol=1e-4, atol=1e-4)


def test_streamed_stats_argument_validation():
    hidden, weight, _, labels = make_batch()
    ref_hidden, ref_head = _ref_parts()
    with pytest.raises(ValueError, match="vocabulary"):
        streamed_token_stats(hidden, weight, labels, reference_hidden=ref_hidden,
                             reference_head=ref_head._replace(weight=ref_head.weight[:-1], bias=None))
    with pytest.raises(ValueError, match="together"):
        streamed_token_stats(hidden, weight, labels, reference_hidden=ref_hidden)
    with pytest.raises(ValueError, match="topk"):
        streamed_token_stats(hidden, weight, labels, topk=-1)


def _new_objectives():
    return {"eaft": EAFT(1.0), "eaft_lf": EAFT(2.0, k=5, normalizer=3.0), "asft": ASFT(0.5),
            "asft_reverse": ASFT(0.5, direction="reverse"), "token_alpha": TokenAlpha(1.0),
            "token_alpha_entropy": TokenAlpha(2.0, signal="entropy", low=0.01, high=0.3)}


@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", list(_new_objectives()))
def test_new_objectives_streamed_equal_full_logits_on_a_model(name, tie, chunk_size):
    """Loss and every parameter's gradient, streamed vs full logits, with another tiny Llama as
    the reference (ASFT): the KL and its gradient go through both models' heads chunk by chunk."""
    model, reference = tiny_llama(tie, seed=5), tiny_llama(True, seed=6)
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)  # sharpen: p and the entropies spread
    reference.requires_grad_(False)
    ids, attn, labels = lm_batch(seed=5)
    objective = _new_objectives()[name]

    def run(streamed):
        model.zero_grad(set_to_none=True)
        if streamed:
            with torch.no_grad():
                ref_hidden = forward_hidden(reference, ids, attn)
            head = streaming_head(model)
            request = objective.requires
            stats = streamed_token_stats(
                forward_hidden(model, ids, attn), head.weight, labels, chunk_size=chunk_size, entropy=request.entropy,
                topk=request.topk, reference_hidden=ref_hidden if request.reference else None,
                reference_head=streaming_head(reference) if request.reference else None, kl=request.kl)
            out = objective.from_stats(stats)
        else:
            with torch.no_grad():
                ref_logits = reference(input_ids=ids, attention_mask=attn).logits
            out = objective(model(input_ids=ids, attention_mask=attn).logits, labels, ref_logits=ref_logits)
        out.loss.backward()
        return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    out_n, g_n = run(False)
    out_s, g_s = run(True)
    assert_close(out_s.loss, out_n.loss, rtol=1e-5, atol=1e-6)
    assert g_s.keys() == g_n.keys() and ("lm_head.weight" in g_s) == (not tie)
    assert all(q.grad is None for q in reference.parameters())
    for n in g_n:
        scale = g_n[n].abs().max()
        assert scale > 0 or n.endswith("norm.weight"), n
        assert_close(g_s[n] / scale.clamp_min(1e-30), g_n[n] / scale.clamp_min(1e-30), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("error, falls_back", [(TypeError("needs pixel_values"), True), (RuntimeError("bug"), False),
                                               (torch.OutOfMemoryError("out of memory"), False)])
def test_the_streaming_self_check_falls_back_only_for_models_that_cannot_run_on_text(error, falls_back, monkeypatch):
    model = tiny_llama()

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(model, "forward", broken)
    if falls_back:
        assert "TypeError: needs pixel_values" in streaming.streaming_unsupported_reason(model)
    else:
        with pytest.raises(type(error)):
            streaming.streaming_unsupported_reason(model)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_streamed_eval_logprobs_matches_the_training_path_and_the_argmax(chunk_size):
    """Validation's numbers: log p equal to the training path's, ``correct`` the argmax of full logits."""
    hidden, weight, bias, labels = make_batch(with_bias=True)
    logits = 3.0 * torch.tanh(F.linear(hidden, weight, bias) / 3.0)
    hit = (labels != IGN) & (torch.arange(labels.shape[1]) % 2 == 0)
    labels = torch.where(hit, logits.argmax(-1), labels)  # half the targets are the argmax
    logp, mask, correct = streamed_eval_logprobs(hidden, weight, labels, IGN, chunk_size, bias=bias, softcap=3.0)
    ref, ref_mask = streamed_token_logprobs(hidden, weight, labels, IGN, chunk_size, bias=bias, softcap=3.0)
    assert torch.equal(logp, ref.detach()) and torch.equal(mask, ref_mask) and not logp.requires_grad
    assert torch.equal(correct, (logits.argmax(-1) == labels) & mask) and correct[hit].all()
