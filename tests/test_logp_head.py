"""LogpHead: a packed batch's log p equals each row's alone, on both paths, even with the model's KV cache on."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bnll_lightning.logp_head import LogpHead
from bnll_lightning.objectives import IGNORE_INDEX


def tiny_llama() -> LlamaForCausalLM:
    """A tiny random Llama with the HF default ``use_cache=True`` (what a direct user of the head has)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = True
    return model


def row(ids: list[int], prompt: int) -> dict[str, torch.Tensor]:
    """One row alone: its first ``prompt`` tokens are not targets."""
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def packed(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``rows`` in one packed sequence: position ids restart at each row, no attention mask (as packing.py builds)."""
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows], 1),
        "position_ids": torch.cat([torch.arange(r["input_ids"].shape[1])[None] for r in rows], 1),
        "labels": torch.cat([r["labels"] for r in rows], 1),
    }


@pytest.mark.parametrize("streamed", [False, True], ids=["full-logits", "streamed"])
def test_packed_log_p_is_each_row_alone_with_the_cache_on(streamed):
    model = tiny_llama()
    head = LogpHead(streamed=streamed, chunk_size=4)
    rows = [row([5, 17, 3, 44, 8, 61], 2), row([9, 2, 70, 33, 12], 1), row([40, 41, 42, 43, 44, 45, 46], 3)]
    batch = packed(rows)

    logp, mask, _ = head.eval(model, batch)
    alone = [head.eval(model, r) for r in rows]
    expected = torch.cat([lp[m] for lp, m, _ in alone])
    assert mask.sum() == expected.numel()
    torch.testing.assert_close(logp[mask], expected, atol=1e-5, rtol=0)

    stats = head.stats(model, batch)  # the training path (with gradient)
    assert torch.equal(stats.mask, mask)
    torch.testing.assert_close(stats.logp[mask].detach(), expected, atol=1e-5, rtol=0)
