"""Self-phrased targets: the model's own correct greedy answers, in its own words, as SFT rows.

This is the data of rejection sampling and self-distillation pipelines (sample, keep what a checker
accepts, fine-tune on it), and the paper's model-strong end (arXiv 2510.00526): targets the base
model already finds likely. A row is kept only when the model's greedy answer is right by the task's
checker, finished before the token budget (it ended its turn), and states the answer where it can be
found (``answer_span``), so label noise (:func:`bnll_lightning.tasks.noise`) can swap the answer and
keep the phrasing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bnll_lightning.evaluate import evaluate_generation
from bnll_lightning.tasks import TASKS

__all__ = ["answer_span", "self_phrased"]


def answer_span(text: str, spellings: Sequence[str]) -> tuple[int, int] | None:
    """``[start, end)`` of the last case-insensitive whole-word occurrence of any of ``spellings``
    in ``text`` (the answer a response ends on), or None."""
    best: tuple[int, int] | None = None
    for spelling in spellings:
        if not spelling:
            continue
        for m in re.finditer(rf"(?<!\w){re.escape(spelling)}(?!\w)", text, re.IGNORECASE):
            if best is None or m.start() > best[0] or (m.start() == best[0] and m.end() > best[1]):
                best = (m.start(), m.end())
    return best


def self_phrased(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    encoder: Any,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Answer ``rows`` greedily and keep those the model gets right, with its answer as the response.

    Args:
        model, tokenizer: The base model (a Hugging Face causal LM) and its tokenizer.
        rows: Rows of a built-in task (``prompt``, ``answer``, ``task``): the task's checker scores
            each answer and its ``spellings`` locate the answer in it.
        encoder: Row -> prompt ids, as :func:`~bnll_lightning.evaluate.evaluate_generation` takes
            (an ``SFTDataModule``: the exact prompt training will use).
        max_new_tokens: Generation budget; an answer that does not end its turn within it is dropped.
        batch_size: Prompts generated together.

    Returns:
        The kept rows (each a copy of its input row with ``response`` = the model's answer,
        ``answer_span``), in input order, and counts: ``asked``,
        ``kept``, ``wrong``, ``unfinished``, ``no_span``.
    """
    result = evaluate_generation(model, tokenizer, rows, encoder, "task", max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)  # fmt: skip
    counts = {"asked": len(rows), "kept": 0, "wrong": 0, "unfinished": 0, "no_span": 0}
    kept = []
    for row, pred in zip(rows, result.predictions):
        if not pred["correct"]:
            counts["wrong"] += 1
            continue
        if pred["new_tokens"] >= max_new_tokens:
            counts["unfinished"] += 1
            continue
        text, answer = pred["prediction"].strip(), str(row["answer"])
        span = answer_span(text, TASKS[row["task"]].spellings(answer))
        if span is None:  # right by the checker's looser reading, but the answer is not written out as such
            counts["no_span"] += 1
            continue
        kept.append({**row, "response": text, "answer_span": list(span)})
    counts["kept"] = len(kept)
    return kept, counts
