"""benchmarks/streaming_backward.py: the checkpoint-per-chunk candidate equals the hand-written streamed backward,
and the --quick harness prints a well-formed table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a folder of scripts

from benchmarks import _common as C  # noqa: E402
from benchmarks import streaming_backward as SB  # noqa: E402
from bnll_lightning.streaming import streamed_token_logprobs  # noqa: E402


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_checkpoint_per_chunk_equals_the_hand_written_backward(chunk_size, with_bias):
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 29, 12, 97
    parts = [torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.5,
             torch.randn(vocab, generator=g) * 0.3 if with_bias else None]  # fmt: skip
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    out = []
    for streamed in (True, False):
        h, w, b = (None if x is None else x.clone().requires_grad_() for x in parts)
        if streamed:
            logp = streamed_token_logprobs(h[None], w, targets[None], chunk_size=chunk_size, bias=b)[0][0]
        else:
            logp = SB.checkpointed_token_logprobs(h, w, targets, chunk_size, bias=b)
        (logp * upstream).sum().backward()
        out.append([logp.detach()] + [x.grad for x in (h, w, b) if x is not None])
    assert out[0][0].dtype == torch.float32
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_quick_harness_prints_every_method_for_every_shape():
    text = SB.main(["--quick", "--threads", "1", "--shapes", "64,16,512"])
    headers, rows = C.parse_markdown_table(text)
    assert headers[1] == "log p" and [r[1] for r in rows] == list(SB.methods(8))
    assert all(float(r[2]) > 0 and float(r[3]) >= 0 for r in rows) and rows[0][4] == "1.000"
