"""Evaluation by generation: greedy (or sampled) answers, scored by an answer checker.

The paper's evidence is accuracy after fine-tuning, measured by generating answers; this module
gives the pieces every evaluation here reuses:

* :func:`generate` - batched, left-padded ``model.generate`` on prompt token ids (KV cache on,
  eval mode, no grad), stopping at eos / the chat template's end-of-turn token;
* :data:`CHECKERS` - ``exact``, ``normalized``, ``task`` (the built-in task's own ``check``) and
  ``math`` (math-verify); :func:`get_checker` picks one by name, None = ``auto``: the task's
  checker for rows of a built-in task, else ``normalized``;
* :func:`evaluate_generation` - prompts formatted exactly as in training
  (``SFTDataModule.encode_prompt``), generation, scoring -> :class:`EvalResult`;
* :func:`pass_at_k` (unbiased, Chen et al. 2021) and :func:`majority_index` (maj@k voting) for
  sampled evaluation, where each prompt gets ``num_samples`` answers;
* :class:`GenerationEval` - a Lightning callback that logs ``val/accuracy`` (and with sampling
  ``val/pass@k``, ``val/maj@n``) at validation end and writes ``predictions/step_<N>.jsonl`` in
  the log directory (add it to ``trainer.callbacks``);
* :func:`main` - ``python -m bnll_lightning evaluate --config configs/demo.yaml
  [--ckpt_path path.ckpt] [--split val] [--num_rows N] [--max_new_tokens M] [--checker name]
  [--output preds.jsonl]``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from bnll_lightning.cli import SFTCLI, load_from_config
# The end-of-turn tokens training puts in the targets: generation stops at the same ones.
from bnll_lightning.data import END_OF_TURN_TOKENS
from bnll_lightning.strategies import is_sharded
from bnll_lightning.tasks import TASKS

__all__ = [
    "CHECKERS",
    "EvalResult",
    "EvaluateCLI",
    "GenerationEval",
    "check_exact",
    "check_math",
    "check_normalized",
    "check_task",
    "evaluate_generation",
    "generate",
    "get_checker",
    "gold_answer",
    "load_checkpoint_weights",
    "main",
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


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: eos and the end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Generate continuations of tokenized prompts with ``model.generate``.

    Prompts are left padded (so every row's new tokens start at the same column) in batches of
    similar length; the result does not depend on the batching. ``temperature == 0`` is greedy
    decoding; otherwise sampling with ``temperature`` and nucleus ``top_p``, seeded by ``seed``
    without touching the global RNG. The model runs in eval mode under no_grad with its KV cache
    (even if training turned ``config.use_cache`` off); its train/eval mode is restored after.

    Returns, per prompt, ``num_samples`` lists of new token ids, cut before the first stop token
    (:func:`stop_token_ids`), at most ``max_new_tokens`` long.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError("max_new_tokens, batch_size and num_samples must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    sample = temperature > 0
    if num_samples > 1 and not sample:
        raise ValueError("num_samples > 1 needs temperature > 0: greedy decoding repeats the same answer")
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
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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
    finally:
        model.train(was_training)
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
    ks = sorted({int(k) for k in (pass_k if pass_k is not None else [num_samples]) if 1 <= int(k) <= num_samples})
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
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
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
        pass_k: With ``num_samples > 1``: the k of pass@k (each <= num_samples; None: num_samples).

    Returns:
        :class:`EvalResult`; ``predictions`` holds one dict per row and sample, in row order:
        ``index``, ``sample``, ``task``, ``prompt``, ``prediction``, ``answer``, ``correct``,
        ``new_tokens``. With ``num_samples > 1`` also ``pass_at`` and ``maj`` (maj@num_samples).
    """
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


# --------------------------------------------------------------------------------------------
# Lightning callback
# --------------------------------------------------------------------------------------------


def _logged_step(trainer: L.Trainer) -> int:
    """The step TensorBoard files this validation's scalars under. Lightning logs by the count of
    finished optimizer steps *before* the current one is counted (so validation after the 15th step
    is filed at 14, beside that step's training scalars); ``global_step`` already says 15."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


class GenerationEval(L.Callback):
    def __init__(
        self,
        every_n_val: int = 1,
        num_rows: int | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        checker: str | None = None,
        predictions_file: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        pass_k: list[int] | None = None,
    ) -> None:
        """Accuracy by generation on the validation rows, at the end of validation.

        Logs ``val/accuracy`` (and writes ``predictions/step_<N>.jsonl`` in the log directory);
        with ``num_samples > 1`` also ``val/pass@k`` for each k of ``pass_k`` and ``val/maj@n``
        (n = num_samples), every one a mean over rows.
        Under DDP each rank generates for its own slice of the rows and the counts are summed,
        so the accuracy is that of all rows (sharded strategies, FSDP/DeepSpeed, are skipped with a
        warning). Needs an ``SFTModule`` (``model``, ``tokenizer``) and an ``SFTDataModule``.

        Args:
            every_n_val: Run on every n-th validation (generation is slower than the val loss).
            num_rows: Score the first N validation rows (None: all); the same rows every time.
            max_new_tokens: Generation budget per answer; longer answers are cut (and usually wrong).
            batch_size: Prompts generated together.
            checker: Answer checker (exact, normalized, task, math); None: the built-in task's own
                checker, else normalized.
            predictions_file: Write per-example predictions (prompt, prediction, answer, correct).
            temperature: 0 is greedy decoding (the paper's evaluation); > 0 samples.
            top_p: Nucleus sampling mass (temperature > 0 only).
            num_samples: Answers per prompt (temperature > 0); accuracy averages over all of them
                (the paper's maths number: mean accuracy of 16 samples at temperature 1).
            seed: Sampling seed (the global RNG is left alone).
            pass_k: The k of the unbiased pass@k (each <= num_samples); None: num_samples alone
                (pass@1 would equal val/accuracy).
        """
        if every_n_val < 1:
            raise ValueError(f"every_n_val must be >= 1, got {every_n_val}")
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 or None, got {num_rows}")
        get_checker(checker)  # fail at construction on an unknown name
        if pass_k is not None and not all(1 <= int(k) <= num_samples for k in pass_k):
            raise ValueError(f"pass_k must lie in [1, num_samples={num_samples}], got {pass_k}")
        self.pass_k = None if pass_k is None else [int(k) for k in pass_k]
        self.every_n_val = every_n_val
        self.num_rows = num_rows
        self.checker = checker
        self.predictions_file = predictions_file
        self.generate_kwargs = dict(
            max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
            top_p=top_p, num_samples=num_samples, seed=seed, pass_k=self.pass_k,
        )
        self.validations = 0
        self._warned_sharded = False
        self.last_result: EvalResult | None = None  # this rank's last result (its slice of rows)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_val:
            return
        if is_sharded(trainer.strategy):
            # Sharded weights are only whole inside the wrapped forward; a generation loop outside it
            # would need every rank in lock step. Evaluate the exported model instead.
            if not self._warned_sharded:
                rank_zero_warn(
                    f"GenerationEval does not run under {type(trainer.strategy).__name__} (sharded weights); "
                    "evaluate the exported model: "
                    "python -m bnll_lightning evaluate --config ... --model.model <hf_model>"
                )
                self._warned_sharded = True
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "raw_rows"):
            raise RuntimeError("GenerationEval needs an SFTDataModule (trainer.datamodule with raw_rows)")
        rows = datamodule.raw_rows("val")[: self.num_rows]
        if not rows:
            rank_zero_warn("GenerationEval: no validation rows; skipping generation")
            return
        # Each rank takes every world_size-th row; indices stay global for the predictions file.
        mine = list(range(trainer.global_rank, len(rows), trainer.world_size))
        start = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            result = evaluate_generation(
                pl_module.model, pl_module.tokenizer, [rows[i] for i in mine], datamodule,
                self.checker, **self.generate_kwargs,
            )
        for p in result.predictions:
            p["index"] = mine[p["index"]]
        self.last_result = result
        # Sums over this rank's rows, reduced over ranks: every metric is that of all rows. The names
        # come from the settings, not the result, so every rank reduces the same number of values.
        samples = self.generate_kwargs["num_samples"]
        ks = (self.pass_k or [samples]) if samples > 1 else []
        extra = {f"pass@{k}": result.pass_at.get(k, 0.0) for k in ks}
        if samples > 1:
            extra[f"maj@{samples}"] = result.maj or 0.0
        counts = torch.tensor([result.correct, result.n, result.rows, *(v * result.rows for v in extra.values())],
                              dtype=torch.float64, device=pl_module.device)
        correct, n, n_rows, *sums = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        accuracy = correct / max(n, 1.0)
        # Identical on every rank already; sync_dist averages equal numbers (and keeps DDP quiet).
        pl_module.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True)
        for name, total in zip(extra, sums):
            pl_module.log(f"val/{name}", total / max(n_rows, 1.0), sync_dist=True)
        path = self._write(trainer, result.predictions) if self.predictions_file else None
        sampled = "".join(f", {name} {total / max(n_rows, 1.0):.3f}" for name, total in zip(extra, sums))
        self.last_step = _logged_step(trainer)
        rank_zero_info(
            f"[bnll] val/accuracy {accuracy:.3f} ({int(correct)}/{int(n)}){sampled} at step {self.last_step}, "
            f"{time.perf_counter() - start:.1f} s" + (f"; predictions: {path}" if path else "")
        )

    def _write(self, trainer: L.Trainer, predictions: list[dict[str, Any]]) -> str | None:
        """Gather every rank's predictions on rank zero and write them there, in row order."""
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(predictions, gathered, dst=0)
            if not trainer.is_global_zero:
                return None
            predictions = sorted((p for part in gathered for p in part), key=lambda p: (p["index"], p["sample"]))
        if not trainer.is_global_zero:
            return None
        return write_jsonl(os.path.join(log_dir, "predictions", f"step_{trainer.global_step}.jsonl"), predictions)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))


# --------------------------------------------------------------------------------------------
# Command line: python -m bnll_lightning evaluate --config configs/X.yaml ...
# --------------------------------------------------------------------------------------------


class EvaluateCLI(SFTCLI):
    """The fit config's model and data, plus the options of ``evaluate``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Lightning checkpoint whose weights to evaluate (None: the config's model).")
        parser.add_argument("--weights_only", type=Optional[bool], default=None,
                            help="torch.load the checkpoint with weights_only (None: True, the safe loader).")
        parser.add_argument("--split", type=Literal["train", "val"], default="val",
                            help="Rows to answer: the data module's val or train rows.")
        parser.add_argument("--num_rows", type=Optional[int], default=None, help="Only the first N rows (None: all).")
        # Generation settings: None takes the config's GenerationEval callback (so the evaluation
        # of a checkpoint follows the protocol the run validated with), else the default shown.
        parser.add_argument("--max_new_tokens", type=Optional[int], default=None,
                            help="Generation budget per answer (None: the config's GenerationEval, else 64).")
        parser.add_argument("--batch_size", type=Optional[int], default=None,
                            help="Prompts generated together (None: the config's GenerationEval, else 16).")
        parser.add_argument("--checker", type=Optional[Literal[tuple(CHECKERS)]], default=None,
                            help="Answer checker (None: the config's GenerationEval's, else auto = the built-in "
                                 "task's own, else normalized).")
        parser.add_argument("--temperature", type=Optional[float], default=None,
                            help="0: greedy; > 0: sampling (None: the config's GenerationEval, else 0).")
        parser.add_argument("--top_p", type=Optional[float], default=None,
                            help="Nucleus sampling mass (None: the config's GenerationEval, else 1).")
        parser.add_argument("--num_samples", type=Optional[int], default=None,
                            help="Answers per prompt, temperature > 0 (None: the config's GenerationEval, else 1).")
        parser.add_argument("--pass_k", type=Optional[list[int]], default=None,
                            help="k of the unbiased pass@k with num_samples > 1 (None: the config's "
                                 "GenerationEval, else num_samples); maj@num_samples is printed too.")
        parser.add_argument("--output", type=Optional[str], default=None,
                            help="Predictions jsonl (default: predictions_<split>.jsonl).")
        parser.add_argument("--show", type=int, default=5, help="Examples printed.")


def load_checkpoint_weights(module: torch.nn.Module, path: str, weights_only: bool | None = None) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``module`` (strict).

    ``weights_only`` (None: True) uses torch's safe loader; False unpickles arbitrary objects
    (only for checkpoints you trust, e.g. with custom classes in their hyper-parameters).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
    module.load_state_dict(checkpoint.get("state_dict", checkpoint))


def _one_line(text: str, width: int = 100) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[: width - 1] + "…"


_GENERATION_DEFAULTS = {"max_new_tokens": 64, "batch_size": 16, "checker": None, "temperature": 0.0, "top_p": 1.0,
                        "num_samples": 1, "pass_k": None}


def generation_settings(cfg: Any, callbacks: Sequence[Any]) -> dict[str, Any]:
    """The evaluate command's generation settings: each option given on the command line, else the
    config's :class:`GenerationEval` callback's, else the default."""
    callback = next((c for c in callbacks if isinstance(c, GenerationEval)), None)
    own = {} if callback is None else {**callback.generate_kwargs, "checker": callback.checker}
    own.pop("seed", None)
    return {key: getattr(cfg, key) if getattr(cfg, key) is not None else own.get(key, default)
            for key, default in _GENERATION_DEFAULTS.items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m bnll_lightning evaluate --config X.yaml [--ckpt_path ...] [--split val] ...``"""
    cli = load_from_config(list(argv or []), EvaluateCLI)
    cfg, module, data, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    if cfg.ckpt_path:
        load_checkpoint_weights(module, cfg.ckpt_path, cfg.weights_only)
    rows = data.raw_rows(cfg.split)[: cfg.num_rows]
    if not rows:
        raise SystemExit(
            f"evaluate: the data has no {cfg.split} rows (train={data.train!r}, val={data.val!r}); nothing to "
            "evaluate. For file data set data.val or data.val_fraction > 0, or use --split train."
        )
    # As the trainer would run it: bf16-true/16-true convert the weights (mixed precision leaves them).
    module = trainer.precision_plugin.convert_module(module)
    module.to(trainer.strategy.root_device)
    settings = generation_settings(cfg, trainer.callbacks)
    checker = settings.pop("checker")
    start = time.perf_counter()
    with trainer.precision_plugin.forward_context():
        result = evaluate_generation(
            module.model, module.tokenizer, rows, data, checker, **settings,
            seed=cfg.seed_everything if isinstance(cfg.seed_everything, int) else 0,
        )
    seconds = time.perf_counter() - start
    output = write_jsonl(cfg.output or f"predictions_{cfg.split}.jsonl", result.predictions)
    weights = cfg.ckpt_path or cfg.model.model
    print(f"model: {weights}")
    sampling = (f"{settings['num_samples']} samples at temperature {settings['temperature']}, top_p {settings['top_p']}"
                if settings["temperature"] > 0 else "greedy")
    print(f"accuracy: {result.accuracy:.4f} ({result.correct}/{result.n}) on {len(rows)} {cfg.split} rows, "
          f"checker {checker or 'auto'}, {sampling}, max_new_tokens {settings['max_new_tokens']}, {seconds:.1f} s")
    for name, value in result.sample_metrics().items():
        print(f"{name}: {value:.4f} (mean over {result.rows} rows)")
    for p in result.predictions[: cfg.show]:
        mark = "ok " if p["correct"] else "BAD"
        print(f"  [{mark}] {_one_line(p['prompt'], 70)!s}\n        -> {_one_line(p['prediction'])!r}"
              f"  (answer {p['answer']!r})")
    print(f"predictions: {output}")
