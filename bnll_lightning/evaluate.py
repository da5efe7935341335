"""Evaluation by generation: greedy (or sampled) answers, scored by an answer checker.

The paper's evidence is accuracy after fine-tuning, measured by generating answers; this module
gives the pieces every evaluation here reuses (the ``GenerationEval`` callback in
:mod:`bnll_lightning.callbacks`, the ``evaluate`` and ``probe`` subcommands in :mod:`bnll_lightning.cli`):

* :func:`generate` - batched, left-padded ``model.generate`` on prompt token ids (KV cache on,
  eval mode, no grad), stopping at eos / the chat template's end-of-turn token;
* :data:`CHECKERS` - ``exact``, ``normalized``, ``task`` (the built-in task's own ``check``) and
  ``math`` (math-verify); :func:`get_checker` picks one by name, None = ``auto``: the task's
  checker for rows of a built-in task, else ``normalized``;
* :func:`evaluate_generation` - prompts formatted exactly as in training
  (``SFTDataModule.encode_prompt``), generation, scoring -> :class:`EvalResult`;
* :func:`pass_at_k` (unbiased, Chen et al. 2021) and :func:`majority_index` (maj@k voting) for
  sampled evaluation, where each prompt gets ``num_samples`` answers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bnll_lightning.formatting import end_of_turn_ids
from bnll_lightning.modes import eval_mode
from bnll_lightning.tasks import TASKS

__all__ = [
    "CHECKERS",
    "EvalResult",
    "check_exact",
    "check_math",
    "check_normalized",
    "check_task",
    "evaluate_generation",
    "generate",
    "get_checker",
    "gold_answer",
    "majority_index",
    "normalize_answer",
    "pass_at_k",
    "stop_token_ids",
    "write_jsonl",
]


Checker = Callable[[str, dict[str, Any]], bool]


# --------------------------------------------------------------------------------------------
# Answer checkers
# --------------------------------------------------------------------------------------------


def gold_answer(row: dict[str, Any]) -> str:
    """The reference answer of a row: its ``answer`` field, else the (last assistant) response."""
    if row.get("answer") is not None:
        return str(row["answer"])
    if "messages" in row:
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        return replies[-1] if replies else ""
    return str(row.get("response", ""))


_TRAILING_PUNCT = ".,;:!?。"


def normalize_answer(text: str) -> str:
    """Casefold, collapse whitespace, drop trailing punctuation: ``" Paris. "`` -> ``"paris"``."""
    return " ".join(str(text).casefold().split()).rstrip(_TRAILING_PUNCT).rstrip()


def check_exact(prediction: str, row: dict[str, Any]) -> bool:
    """The prediction equals the answer up to surrounding whitespace."""
    return prediction.strip() == gold_answer(row).strip()


def check_normalized(prediction: str, row: dict[str, Any]) -> bool:
    """Equal after :func:`normalize_answer` (case, whitespace, trailing punctuation)."""
    return normalize_answer(prediction) == normalize_answer(gold_answer(row))


def check_task(prediction: str, row: dict[str, Any]) -> bool:
    """The built-in task's own ``check(prediction, row)`` (``row["task"]`` names the task)."""
    name = row.get("task")
    if name not in TASKS:
        raise ValueError(
            f"checker 'task' needs rows of a built-in task (row['task'] in {sorted(TASKS)}), got task={name!r}; "
            "use checker 'normalized', 'exact' or 'math' for other data"
        )
    return bool(TASKS[name].check(prediction, row))


def check_math(prediction: str, row: dict[str, Any]) -> bool:
    """Mathematical equivalence with math-verify: the prediction's answer (a ``\\boxed{}`` one
    first) against the gold answer (``"0.5"`` matches ``\\boxed{1/2}``)."""
    from math_verify import parse, verify

    gold = gold_answer(row).strip()
    # A bare gold answer ("0.5", "x+1") is read as LaTeX math, as if it had been boxed.
    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"\\boxed{{{gold}}}")
    return bool(gold_parsed) and bool(verify(gold_parsed, parse(prediction)))


def check_auto(prediction: str, row: dict[str, Any]) -> bool:
    """The task's own checker for rows of a built-in task, else :func:`check_normalized`."""
    if row.get("task") in TASKS:
        return check_task(prediction, row)
    return check_normalized(prediction, row)


CHECKERS: dict[str, Checker] = {
    "auto": check_auto,
    "exact": check_exact,
    "normalized": check_normalized,
    "task": check_task,
    "math": check_math,
}


def get_checker(name: str | None) -> Checker:
    """The checker called ``name`` (None: ``auto``)."""
    key = "auto" if name is None else str(name).strip()
    if key not in CHECKERS:
        raise ValueError(f"unknown checker {name!r}; valid checkers: {', '.join(CHECKERS)}")
    return CHECKERS[key]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationArgs:
    """How answers are generated: the one place the defaults are written (greedy, one answer per prompt).

    Attributes:
        max_new_tokens: Generation budget per answer, >= 1; longer answers are cut (and usually wrong).
        batch_size: Prompts generated together, >= 1.
        temperature: 0 is greedy decoding (the paper's evaluation); > 0 samples.
        top_p: Nucleus sampling mass in (0, 1] (temperature > 0 only).
        num_samples: Answers per prompt, >= 1; more than one needs temperature > 0.
        seed: Sampling seed (the global RNG is left alone).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("max_new_tokens, batch_size and num_samples must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.num_samples > 1 and not self.temperature > 0:
            raise ValueError("num_samples > 1 needs temperature > 0: greedy decoding repeats the same answer")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the end-of-turn ids training puts in the targets, sorted."""
    return sorted(end_of_turn_ids(tokenizer))


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = GenerationArgs.max_new_tokens,
    batch_size: int = GenerationArgs.batch_size,
    temperature: float = GenerationArgs.temperature,
    top_p: float = GenerationArgs.top_p,
    num_samples: int = GenerationArgs.num_samples,
    seed: int = GenerationArgs.seed,
) -> list[list[list[int]]]:
    """Generate continuations of tokenized prompts with ``model.generate``.

    Prompts are left padded (so every row's new tokens start at the same column) in batches of
    similar length; the result does not depend on the batching. ``temperature == 0`` is greedy
    decoding; otherwise sampling with ``temperature`` and nucleus ``top_p``, seeded by ``seed``
    without touching the global RNG. The model runs in eval mode under no_grad with its KV cache
    (even if training turned ``config.use_cache`` off); its train/eval mode is restored after.

    Returns, per prompt, ``num_samples`` lists of new token ids, cut before the first stop token
    (:func:`stop_token_ids`), at most ``max_new_tokens`` long. Each argument is the
    :class:`GenerationArgs` field of its name (default, checks).
    """
    from transformers import GenerationConfig

    GenerationArgs(max_new_tokens, batch_size, temperature, top_p, num_samples, seed)  # checks them
    sample = temperature > 0
    stops = stop_token_ids(tokenizer)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        num_return_sequences=num_samples,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,  # training sets config.use_cache=False; generation wants the cache
        **({"temperature": temperature, "top_p": top_p, "top_k": None} if sample else {}),
    )
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (little padding), and memory peaks at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[list[int]]] = [[] for _ in prompts]
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer.pad(
                [{"input_ids": list(prompts[i])} for i in chunk],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            tokens = model.generate(**batch, generation_config=config)
            new = tokens[:, batch["input_ids"].shape[1] :].tolist()
            for k, ids in enumerate(new):
                cut = next((j for j, t in enumerate(ids) if t in stop_set), len(ids))
                out[chunk[k // num_samples]].append(ids[:cut])
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct answers among ``n`` samples (Chen et al. 2021,
    arXiv 2107.03374): the chance that ``k`` of the ``n`` drawn without replacement hold a correct
    one, 1 - C(n - c, k) / C(n, k). Averaged over prompts it estimates pass@k without the bias of
    scoring just the first k samples."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # Exact integer binomials and one correctly rounded division (Python ints): no overflow and no
    # loss of precision, which the float product form of the paper's code exists to avoid.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(predictions: Sequence[str], checker: str | Checker | None = None) -> int | None:
    """Index of the answer a majority vote over ``predictions`` (one prompt's samples) picks.

    Votes go to equivalence classes of answers: for the ``math`` checker, mathematical
    equivalence of the extracted answers (math-verify; a sample without a parsable answer does
    not vote); otherwise the text after :func:`normalize_answer` (``exact``: after ``strip``).
    The class with most votes wins, ties going to the class seen first; its first member is
    returned (scoring it gives maj@n). None when no sample votes.
    """
    if checker == "math":
        from math_verify import parse, verify

        parsed = [parse(p) for p in predictions]

        def same(a: int, b: int) -> bool:
            return bool(verify(parsed[a], parsed[b]))

        voters = [i for i, x in enumerate(parsed) if x]
    else:
        keys = [p.strip() if checker == "exact" else normalize_answer(p) for p in predictions]

        def same(a: int, b: int) -> bool:
            return keys[a] == keys[b]

        voters = list(range(len(predictions)))
    classes: list[list[int]] = []  # members of each class, in order of first appearance
    for i in voters:
        for members in classes:
            if same(members[0], i):
                members.append(i)
                break
        else:
            classes.append([i])
    if not classes:
        return None
    return max(classes, key=len)[0]  # max keeps the first of equal lengths: ties go to the earliest class


@dataclass
class EvalResult:
    """Accuracy over all scored predictions (rows x samples) and the predictions themselves.

    With several samples per row also pass@k (unbiased, mean over rows) and maj@n (the share of
    rows whose majority answer is correct)."""

    accuracy: float
    n: int
    correct: int
    predictions: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    pass_at: dict[int, float] = field(default_factory=dict)
    """k -> mean over rows of :func:`pass_at_k` (only for k <= samples per row)."""
    maj: float | None = None
    """maj@n: mean over rows of whether the majority vote (:func:`majority_index`) is correct."""

    def sample_metrics(self) -> dict[str, float]:
        """``{"pass@k": ..., "maj@n": ...}`` for logging; empty with one sample per row."""
        if not self.rows or self.n <= self.rows:
            return {}
        metrics = {f"pass@{k}": v for k, v in sorted(self.pass_at.items())}
        if self.maj is not None:
            metrics[f"maj@{self.n // self.rows}"] = self.maj
        return metrics


def _sample_metrics(
    predictions: Sequence[dict[str, Any]], num_samples: int, pass_k: Sequence[int] | None, checker: Any
) -> tuple[dict[int, float], float | None]:
    """pass@k per k and maj@n, each a mean over rows, from per-sample predictions."""
    by_row: dict[int, list[dict[str, Any]]] = {}
    for p in predictions:
        by_row.setdefault(p["index"], []).append(p)
    if not by_row or num_samples < 2:
        return {}, None
    ks = sorted({int(k) for k in (pass_k if pass_k is not None else [num_samples])})
    name = checker if isinstance(checker, str) or checker is None else None
    pass_sums, maj_sum = dict.fromkeys(ks, 0.0), 0.0
    for samples in by_row.values():
        c = sum(bool(p["correct"]) for p in samples)
        for k in ks:
            pass_sums[k] += pass_at_k(len(samples), c, k)
        winner = majority_index([p["prediction"] for p in samples], name)
        maj_sum += float(winner is not None and bool(samples[winner]["correct"]))
    rows = len(by_row)
    return {k: v / rows for k, v in pass_sums.items()}, maj_sum / rows


def display_prompt(row: dict[str, Any]) -> str:
    """The row's own prompt text (the last user turn of a conversation), without the template."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    users = [m["content"] for m in row.get("messages", []) if m["role"] == "user"]
    return users[-1] if users else ""


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    encoder: Any,
    checker: str | Checker | None = None,
    *,
    max_new_tokens: int = GenerationArgs.max_new_tokens,
    batch_size: int = GenerationArgs.batch_size,
    temperature: float = GenerationArgs.temperature,
    top_p: float = GenerationArgs.top_p,
    num_samples: int = GenerationArgs.num_samples,
    seed: int = GenerationArgs.seed,
    pass_k: Sequence[int] | None = None,
) -> EvalResult:
    """Generate an answer to each row and score it.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (needs a pad or eos token).
        rows: Canonical rows (``SFTDataModule.raw_rows``): ``prompt`` or ``messages``, plus
            ``answer``/``task`` when known.
        encoder: Turns a row into prompt token ids: an ``SFTDataModule`` (its ``encode_prompt``:
            the exact masked prefix of training) or a callable ``row -> list[int]``.
        checker: A name in :data:`CHECKERS`, a callable ``(prediction, row) -> bool``, or None
            (``auto``: the built-in task's checker, else ``normalized``).
        max_new_tokens, batch_size, temperature, top_p, num_samples, seed: see :func:`generate`.
        pass_k: With ``num_samples > 1``: the k of pass@k (each in [1, num_samples], else ValueError;
            None: num_samples).

    Returns:
        :class:`EvalResult`; ``predictions`` holds one dict per row and sample, in row order:
        ``index``, ``sample``, ``task``, ``prompt``, ``prediction``, ``answer``, ``correct``,
        ``new_tokens``. With ``num_samples > 1`` also ``pass_at`` and ``maj`` (maj@num_samples).
    """
    if pass_k is not None and not all(1 <= int(k) <= num_samples for k in pass_k):
        raise ValueError(f"pass_k must lie in [1, num_samples={num_samples}] (pass@k draws k of the samples), "
                         f"got {list(pass_k)}")
    check = checker if callable(checker) else get_checker(checker)
    encode = getattr(encoder, "encode_prompt", encoder)
    prompts = [encode(row) for row in rows]
    generated = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, top_p=top_p, num_samples=num_samples, seed=seed,
    )
    predictions = []
    for index, (row, samples) in enumerate(zip(rows, generated)):
        for s, ids in enumerate(samples):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            predictions.append({
                "index": index,
                "sample": s,
                "task": row.get("task"),
                "prompt": display_prompt(row),
                "prediction": text,
                "answer": gold_answer(row),
                "correct": bool(check(text, row)),
                "new_tokens": len(ids),
            })
    correct = sum(p["correct"] for p in predictions)
    pass_at, maj = _sample_metrics(predictions, num_samples, pass_k, checker)
    return EvalResult(correct / max(len(predictions), 1), len(predictions), correct, predictions, len(rows), pass_at,
                      maj)


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> str:
    """Write one JSON object per line (UTF-8, parent directories created); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
