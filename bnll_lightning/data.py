"""SFT data: rows -> tokenized, prompt-masked, padded batches.

Sources (``train`` / ``val`` arguments of :class:`SFTDataModule`, comma-separated lists allowed):

* ``builtin:<task>`` - rows generated offline by :mod:`bnll_lightning.tasks`;
* a local file, glob or directory: ``.jsonl``, ``.json``, ``.parquet``, ``.csv``;
* anything else is a Hugging Face hub dataset name, ``name`` or ``name:config``
  (``datasets.load_dataset(name, config, split=...)``); ``hub:name`` forces the hub.

Rows are ``{"prompt": str, "response": str}`` (``completion`` is accepted for ``response``; a
conversational ``prompt``/``completion`` pair of message lists is turned into ``messages``) or
``{"messages": [{"role": ..., "content": ...}, ...]}``. Optional ``answer`` / ``task`` /
``noisy`` fields are carried along for evaluation.

Batches (``collate``) are ``{"input_ids", "attention_mask", "labels"}`` LongTensors of shape
``[B, T]``, right padded; ``labels`` follow the Hugging Face convention: same positions as
``input_ids`` (NOT shifted), ``-100`` on prompt/template/padding tokens.

Formatting
    With a chat template: the full conversation is rendered with ``apply_chat_template`` and
    tokenized once; for each assistant turn the conversation up to that turn (with the generation
    prompt) and up to the end of that turn are rendered and tokenized too; both must be token
    prefixes of the full conversation (checked, :class:`DataError` otherwise). The tokens in
    between are the turn's targets: its content and end-of-turn token (``<|im_end|>``); a template
    separator after the end-of-turn token (ChatML's ``"\\n"``) stays masked. Every assistant turn
    with non-empty content is trained; system/user turns and turn headers are masked.

    Without a chat template (or ``use_chat_template=False``): ``[system_prompt + "\\n\\n"] +
    prompt + "\\n"`` (masked; tokenized with the tokenizer's special prefix such as BOS), then the
    response (+ EOS if ``add_eos``) as targets, each part tokenized separately so the prompt tokens
    are exactly what generation will see. ``messages`` rows: system ``content + "\\n\\n"`` and user
    ``content + "\\n"`` masked, assistant ``content`` (+ EOS) trained, ``"\\n"`` between turns masked.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from bnll_lightning import tasks as _tasks
from bnll_lightning.models import load_tokenizer
from bnll_lightning.sampling import ResumableDataLoader, ResumableSampler
from bnll_lightning.tasks import Task, get_task

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataError",
    "SFTDataModule",
    "TokenizedDataset",
    "load_rows",
    "normalize_row",
]

IGNORE_INDEX = -100
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
STAT_KEYS = (
    "rows_in",  # rows read/generated for the split (after the val split, before skipping)
    "rows",  # rows emitted (tokenized, >= 1 target token)
    "tokens",  # non-padding tokens emitted
    "target_tokens",  # tokens with a label (!= -100)
    "truncated",  # rows cut at max_length but kept (truncation="right")
    "skipped_empty_response",  # rows without a non-empty response / assistant turn
    "skipped_truncated",  # rows whose targets were entirely cut away (truncation="right")
    "skipped_too_long",  # rows longer than max_length (truncation="drop")
    "noisy",  # rows whose response was corrupted (train only)
)
# End-of-turn tokens of common chat templates (in addition to the tokenizer's eos token).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class DataError(ValueError):
    """A problem with the data (malformed file, missing field, template not prefix-consistent)."""


# --------------------------------------------------------------------------------------------
# Sources and row loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    kind: Literal["builtin", "file", "hub"]
    name: str  # task name, file path or hub dataset name
    config: str | None = None


def _derive_seed(seed: int, *tags: str) -> int:
    """A stable 63-bit seed from ``seed`` and tags (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join([str(int(seed)), *tags]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_sources(spec: str) -> list[_Source]:
    """Parse a source string (see the module docstring) into sources; local files are expanded."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise DataError(f"empty data source {spec!r}")
    out: list[_Source] = []
    for item in items:
        if item.startswith("builtin:"):
            name = item[len("builtin:"):].strip()
            try:
                get_task(name)
            except KeyError as err:
                raise DataError(str(err.args[0])) from None
            out.append(_Source("builtin", name))
            continue
        if item.startswith("hub:"):
            out.append(_hub_source(item[len("hub:"):]))
            continue
        expanded = os.path.expanduser(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if _is_data_file(Path(p)))
            if not matches:
                raise DataError(f"no {'/'.join(FILE_SUFFIXES)} file matches {item!r}")
            out.extend(_Source("file", p) for p in matches)
            continue
        path = Path(expanded)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_data_file(p))
            if not files:
                raise DataError(f"directory {item!r} holds no {'/'.join(FILE_SUFFIXES)} file")
            out.extend(_Source("file", str(p)) for p in files)
        elif path.is_file():
            if not _is_data_file(path):
                raise DataError(f"unsupported file type {path.suffix!r} for {item!r}; use {', '.join(FILE_SUFFIXES)}")
            out.append(_Source("file", str(path)))
        elif path.suffix.lower() in FILE_SUFFIXES or item.startswith((".", "/", "~")):
            raise DataError(f"data file not found: {item!r}")
        else:
            out.append(_hub_source(item))
    return out


def _is_data_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in FILE_SUFFIXES


def _hub_source(item: str) -> _Source:
    name, _, config = item.partition(":")
    return _Source("hub", name.strip(), config.strip() or None)


def _read_jsonl(path: str) -> tuple[list[Any], list[str]]:
    """Parse JSON Lines strictly, naming ``path`` and ``line N`` (1-based) on any problem."""
    rows, where = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))  # the newline would move the error to "line 2 column 1"
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}: line {lineno}: malformed JSON: {err.msg} (column {err.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}: line {lineno}: expected a JSON object per line, got {type(obj).__name__}"
                    )
                where.append(f"{path}: row {len(rows)} (line {lineno})")
                rows.append(obj)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text ({err})") from None
    return rows, where


def _read_json(path: str) -> tuple[list[Any], list[str]]:
    """A JSON array of objects, ``{"data"|"rows"|"examples"|"train": [...]}``, a columnar dict of
    equal-length lists, or (if it is in fact JSON Lines) one object per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text ({err})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines in a .json file
            return _read_jsonl(path)
        raise DataError(f"{path}: line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "rows", "examples", "train"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            lists = [v for v in obj.values()]
            if obj and all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1:
                obj = [dict(zip(obj, values)) for values in zip(*lists)]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of row objects, got {type(obj).__name__}")
    return obj, [f"{path}: row {i}" for i in range(len(obj))]


def _read_parquet(path: str) -> tuple[list[Any], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:  # what pyarrow raises for a corrupt or truncated file
        raise DataError(f"{path}: cannot read parquet file: {err}") from err
    return rows, [f"{path}: row {i}" for i in range(len(rows))]


def _read_csv(path: str) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                where.append(f"{path}: row {len(rows)} (line {reader.line_num})")
                rows.append(dict(row))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read CSV: {err}") from None
    return rows, where


def _read_hub(name: str, config: str | None, split: str, max_rows: int | None) -> tuple[list[Any], list[str]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except (OSError, ValueError) as err:  # not found, offline, unknown config or split: a data error
        raise DataError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub: {err}. "
            f"(It is not a local file nor builtin:<task>; valid tasks: {', '.join(sorted(_tasks.TASKS))}.)"
        ) from err
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = ds.to_list()
    label = f"{name}{':' + config if config else ''}[{split}]"
    return rows, [f"{label}: row {i}" for i in range(len(rows))]


# Roles chat templates know; anything else (ShareGPT's "human"/"gpt", "bot") would never be trained on.
ROLES = ("system", "developer", "user", "assistant", "tool")

def _content_key(row: dict[str, Any]) -> str:
    """What a row trains on: its prompt and response, or its conversation."""
    return json.dumps(row.get("messages") or [row.get("prompt"), row.get("response")], sort_keys=True)


def _warn_duplicates(train: list[dict[str, Any]], val: list[dict[str, Any]]) -> None:
    """Warn, with counts, when file or hub data repeats itself: validation rows that are also training rows
    (the validation numbers then measure memory), or training rows that are mostly copies. Built-in tasks
    check their own prompts (``_builtin_val``)."""
    files = [r for r in train if "source" in r]  # file and hub rows; generated rows carry no source
    keys = [_content_key(r) for r in files]
    distinct = set(keys)
    if keys and len(keys) - len(distinct) > len(keys) / 2:
        rank_zero_warn(f"training data: {len(keys) - len(distinct)} of {len(keys)} file rows are repeats of"
                       f" another row (only {len(distinct)} distinct)")  # fmt: skip
    overlap = sum(_content_key(r) in distinct for r in val)
    if overlap:
        rank_zero_warn(f"validation data: {overlap} of {len(val)} rows are also training rows (same prompt and"
                       " response): val/* then partly measures memorisation")  # fmt: skip


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def _check_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: {field}[{j}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f"{where}: missing field '{field}[{j}].{key}'")
        content = "" if msg["content"] is None else msg["content"]
        if not isinstance(msg["role"], str):
            raise DataError(f"{where}: field '{field}[{j}].role' must be a string")
        if msg["role"] not in ROLES:
            found = sorted({str(m.get("role")) for m in messages if isinstance(m, dict)} - set(ROLES))
            raise DataError(
                f"{where}: unknown role(s) {', '.join(map(repr, found))} in {field!r}; roles are {', '.join(ROLES)}"
                " (ShareGPT's human/gpt are user/assistant: rename them)"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{field}[{j}].content' must be a string, got {type(content).__name__}")
        out.append({"role": msg["role"], "content": content})
    return out


def normalize_row(row: Any, where: str) -> dict[str, Any]:
    """Validate one raw row and return its canonical form (a new dict).

    Canonical forms: ``{"prompt": str, "response": str, ...}`` or ``{"messages": [...], ...}``,
    plus ``answer`` / ``task`` / ``noisy`` when present and ``source`` (= ``where``).
    A null response becomes ``""`` (skipped later as empty). Raises :class:`DataError` naming
    the missing/invalid field and ``where`` (file and row index).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    out: dict[str, Any] = {k: row[k] for k in ("answer", "task", "noisy") if row.get(k) is not None}
    out["source"] = where
    if row.get("messages") is not None:
        out["messages"] = _check_messages(row["messages"], where)
        return out
    if "prompt" not in row:
        raise DataError(
            f"{where}: missing field 'prompt' (rows need 'prompt' and 'response', or 'messages'; "
            f"found fields: {sorted(row)})"
        )
    resp_key = "response" if "response" in row else "completion" if "completion" in row else None
    if resp_key is None:
        raise DataError(f"{where}: missing field 'response' (found fields: {sorted(row)})")
    prompt, response = row["prompt"], row[resp_key]
    if isinstance(prompt, list):  # conversational prompt/completion
        msgs = _check_messages(prompt, where, "prompt")
        if isinstance(response, list):
            msgs += _check_messages(response, where, resp_key)
        else:
            msgs.append({"role": "assistant", "content": "" if response is None else str(response)})
        out["messages"] = msgs
        return out
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if response is None:
        response = ""
    if not isinstance(response, str):
        raise DataError(f"{where}: field {resp_key!r} must be a string, got {type(response).__name__}")
    out["prompt"] = prompt
    out["response"] = response
    return out


def load_rows(source: _Source, split: str = "train", max_rows: int | None = None) -> list[dict[str, Any]]:
    """Canonical rows of one file or hub source (see :func:`normalize_row`)."""
    if source.kind == "file":
        rows, where = _READERS[Path(source.name).suffix.lower()](source.name)
        if max_rows is not None:
            rows, where = rows[:max_rows], where[:max_rows]
    elif source.kind == "hub":
        rows, where = _read_hub(source.name, source.config, split, max_rows)
    else:
        raise ValueError(f"load_rows does not handle {source.kind} sources")
    return [normalize_row(row, w) for row, w in zip(rows, where)]


# --------------------------------------------------------------------------------------------
# Dataset and collation
# --------------------------------------------------------------------------------------------


class TokenizedDataset(Dataset):
    """In-memory list of ``{"input_ids": list[int], "labels": list[int]}`` features."""

    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class Collator:
    """Right-pad features to the batch's longest row (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` (``pad_token_id`` on padding), ``attention_mask`` (0 on padding) and
    ``labels`` (-100 on padding), all ``torch.long`` of shape ``[B, T]``. Picklable, so it works
    with ``num_workers > 0``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, (feat, n) in enumerate(zip(features, lengths)):
            input_ids[i, :n] = torch.as_tensor(feat["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(feat.get("labels", feat["input_ids"]), dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data: built-in tasks, local files or hub datasets, tokenized once
    in ``setup`` with prompt masking (see the module docstring for formats and masking)."""

    def __init__(
        self,
        train: str = "builtin:sort",
        val: str | None = None,
        val_fraction: float = 0.05,
        train_split: str = "train",
        val_split: str = "validation",
        num_train: int = 512,
        num_val: int = 64,
        max_rows: int | None = None,
        max_length: int = 512,
        truncation: Literal["right", "drop"] = "right",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        noise: float = 0.0,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        add_eos: bool = True,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            train: Training data: ``builtin:<task>`` (tasks: sort, reverse, add, figlet, capital,
                uppercase, plural), a local .jsonl/.json/.parquet/.csv file, glob or directory,
                or a Hugging Face hub dataset ``name[:config]``; comma-separate to combine.
            val: Validation data, same forms. None: built-in tasks draw ``num_val`` fresh rows
                from a separate seed stream (disjoint from train when the task allows it);
                file/hub rows are split off train (``val_fraction``, seeded).
            val_fraction: Fraction of file/hub training rows held out for validation when
                ``val`` is None (0 disables validation).
            train_split: Split name used for hub training datasets.
            val_split: Split name used for hub validation datasets.
            num_train: Rows generated per built-in training task.
            num_val: Rows generated per built-in validation task.
            max_rows: Optional cap on rows read from each file/hub source (first N).
            max_length: Maximum tokens per row (prompt + response).
            truncation: ``right``: cut rows at ``max_length`` (rows with no target left are
                skipped); ``drop``: skip rows longer than ``max_length``.
            batch_size: Training batch size.
            val_batch_size: Validation batch size (None: ``batch_size``).
            num_workers: DataLoader worker processes.
            pad_to_multiple_of: Round the padded length up to a multiple of this (None: no rounding).
            seed: Seed for generation, the val split, noise and the training order.
            noise: Fraction of TRAIN rows whose response is corrupted (built-in tasks: a plausible
                wrong answer; files: another row's response); ``answer`` stays the truth.
            system_prompt: System message prepended to every conversation (None: the chat
                template's default, if any; without a chat template, text before the prompt).
            use_chat_template: Format with the tokenizer's chat template when it has one.
            add_eos: Without a chat template, append the EOS token to each response so the model
                learns to stop.
            tokenizer: Hugging Face tokenizer (normally linked from the model by the CLI; or call
                ``set_tokenizer``). A string is loaded with ``bnll_lightning.models.load_tokenizer``.
        """
        super().__init__()
        if truncation not in ("right", "drop"):
            raise ValueError(f"truncation must be 'right' or 'drop', got {truncation!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
        if num_train < 0 or num_val < 0:
            raise ValueError("num_train and num_val must be >= 0")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train = train
        self.val = val
        self.val_fraction = val_fraction
        self.train_split = train_split
        self.val_split = val_split
        self.num_train = num_train
        self.num_val = num_val
        self.max_rows = max_rows
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.noise = noise
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.add_eos = add_eos
        self.tokenizer = None
        self.stats: dict[str, dict[str, int]] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._datasets: dict[str, TokenizedDataset] = {}
        self._ready = False
        self._train_sources = resolve_sources(train)
        self._val_sources = resolve_sources(val) if val is not None else None
        builtin = {s.name for s in self._train_sources if s.kind == "builtin"}
        only_builtin = all(s.kind == "builtin" for s in self._train_sources)
        #: The :class:`~bnll_lightning.tasks.Task` when train is a single built-in task, else None.
        self.task: Task | None = get_task(builtin.pop()) if only_builtin and len(builtin) == 1 else None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # -- tokenizer ---------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Set (or replace) the tokenizer; tokenized data is rebuilt at the next ``setup``."""
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is not self.tokenizer:
            self._ready = False
        self.tokenizer = tokenizer

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError(
                "SFTDataModule has no tokenizer: pass tokenizer=... (the CLI links model.tokenizer) "
                "or call datamodule.set_tokenizer(tok) before setup()."
            )
        return self.tokenizer

    @property
    def chat(self) -> bool:
        """Whether rows are formatted with the tokenizer's chat template."""
        tok = self._require_tokenizer()
        return bool(self.use_chat_template and getattr(tok, "chat_template", None))

    @property
    def pad_token_id(self) -> int:
        tok = self._require_tokenizer()
        for value in (tok.pad_token_id, tok.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download hub datasets once (rank 0); local and built-in sources need nothing."""
        for sources, split in ((self._train_sources, self.train_split), (self._val_sources or [], self.val_split)):
            for src in sources:
                if src.kind == "hub":
                    _read_hub(src.name, src.config, split, max_rows=1)

    def setup(self, stage: str | None = None) -> None:
        """Load, split, corrupt (``noise``) and tokenize both splits once; cached afterwards."""
        if self._ready:
            return
        tok = self._require_tokenizer()
        if self.use_chat_template and not getattr(tok, "chat_template", None):
            rank_zero_warn("use_chat_template=True but the tokenizer has no chat template: using plain formatting")
        train_rows, val_rows = self._load_splits()
        noisy = 0
        if self.noise > 0:
            train_rows = _tasks.noise(train_rows, self.noise, _derive_seed(self.seed, "noise"))
            noisy = sum(bool(r.get("noisy")) for r in train_rows)
        self._init_encoder()
        self.stats = {}
        for split, rows in (("train", train_rows), ("val", val_rows)):
            kept, features, stats = self._tokenize(rows)
            stats["noisy"] = noisy if split == "train" else 0
            self._rows[split] = kept
            self._datasets[split] = TokenizedDataset(features)
            self.stats[split] = stats
            self._warn(split, stats)
        if not self._datasets["train"].features:
            raise DataError(f"no usable training rows in {self.train!r} (stats: {self.stats['train']})")
        self._ready = True

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches; the order is a function of (seed, epoch) and resumes mid-epoch
        (see :mod:`bnll_lightning.sampling`). Under DDP/FSDP each rank gets its shard."""
        self.setup()
        trainer = getattr(self, "trainer", None)
        sampler = ResumableSampler(
            self._datasets["train"],
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=int(self.seed),
        )
        return ResumableDataLoader(
            self._datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; ``[]`` (no validation) when there are no val rows."""
        self.setup()
        if not self._datasets["val"].features:
            return []
        return DataLoader(
            self._datasets["val"],
            batch_size=self.val_batch_size or self.batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # -- public helpers ----------------------------------------------------------------------

    @property
    def collator(self) -> Collator:
        return Collator(self.pad_token_id, self.pad_to_multiple_of)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad features into a batch (see :class:`Collator`)."""
        return self.collator(features)

    @property
    def train_dataset(self) -> TokenizedDataset:
        self.setup()
        return self._datasets["train"]

    @property
    def val_dataset(self) -> TokenizedDataset:
        self.setup()
        return self._datasets["val"]

    def raw_rows(self, split: Literal["train", "val"] = "val") -> list[dict[str, Any]]:
        """Canonical un-tokenized rows of ``split``, aligned 1:1 with its dataset (skipped rows are
        excluded): ``prompt``/``response`` or ``messages``, plus ``answer``, ``task``, ``noisy``,
        ``source`` when known. For generation-based evaluation use :meth:`encode_prompt` on them
        and ``get_task(row["task"]).check(prediction, row)``."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.setup()
        return [dict(row) for row in self._rows[split]]

    def format_prompt(self, row: dict[str, Any] | str) -> str:
        """The text a model sees before generating the (last) response of ``row``, formatted
        exactly as in training. ``row`` is a row dict (``prompt`` [+ ``response``], or ``messages``
        ending with the assistant turn to predict or with the user turn to answer) or a prompt
        string."""
        if self.chat:
            return self._render(self._prompt_messages(row), add_generation_prompt=True)
        eos = self.tokenizer.eos_token or ""
        return "".join(
            text + (eos if trained and self.add_eos else "") for text, trained in self._prompt_parts(row)
        )

    def encode_prompt(self, row: dict[str, Any] | str) -> list[int]:
        """Token ids of :meth:`format_prompt`; identical to the masked prefix of the training row."""
        self._init_encoder()
        if self.chat:
            return self._ids(self.format_prompt(row))
        return self._plain_ids(self._prompt_parts(row))[0]

    @staticmethod
    def _without_answer(row: dict[str, Any] | str) -> dict[str, Any]:
        """``{"prompt": ...}``, or ``{"messages": [...]}`` without a final assistant turn."""
        if isinstance(row, str):
            return {"prompt": row}
        if "messages" not in row:
            return {"prompt": row["prompt"]}
        msgs = [dict(m) for m in row["messages"]]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return {"messages": msgs}

    def _prompt_messages(self, row: dict[str, Any] | str) -> list[dict[str, str]]:
        row = self._without_answer(row)
        msgs = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _prompt_parts(self, row: dict[str, Any] | str) -> list[tuple[str, bool]]:
        row = self._without_answer(row)
        if "messages" in row:
            return self._plain_parts({"messages": row["messages"] + [{"role": "assistant", "content": ""}]})[:-1]
        return self._plain_parts({"prompt": row["prompt"], "response": ""})[:-1]

    # -- loading and splitting ---------------------------------------------------------------

    def _load_splits(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train_rows: list[dict[str, Any]] = []
        val_rows: list[dict[str, Any]] = []
        builtin_train: list[_Source] = []
        for src in self._train_sources:
            if src.kind == "builtin":
                builtin_train.append(src)
                train_rows += get_task(src.name).generate(self.num_train, _derive_seed(self.seed, "train", src.name))
                continue
            rows = load_rows(src, self.train_split, self.max_rows)
            if self._val_sources is None:
                rows, held_out = self._split(rows, src.name)
                val_rows += held_out
            train_rows += rows
        train_prompts = {r["prompt"] for r in train_rows if "prompt" in r}
        if self._val_sources is None:
            for src in builtin_train:
                val_rows += self._builtin_val(src.name, train_prompts)
        else:
            for src in self._val_sources:
                if src.kind == "builtin":
                    val_rows += self._builtin_val(src.name, train_prompts)
                else:
                    val_rows += load_rows(src, self.val_split, self.max_rows)
        _warn_duplicates(train_rows, val_rows)
        return train_rows, val_rows

    def _split(self, rows: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Seeded, disjoint hold-out of ``round(val_fraction * n)`` rows (>= 1 when the fraction is
        positive and n >= 2); both parts keep file order. The split depends on the seed, the
        file's base name and its rows, not on where the file lives."""
        n = len(rows)
        n_val = min(n - 1, max(1, round(self.val_fraction * n))) if self.val_fraction > 0 and n >= 2 else 0
        if n_val <= 0:
            return rows, []
        order = list(range(n))
        random.Random(_derive_seed(self.seed, "split", Path(name).name)).shuffle(order)
        held = set(order[:n_val])
        return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]

    def _builtin_val(self, name: str, exclude: set[str]) -> list[dict[str, Any]]:
        """``num_val`` rows with distinct prompts from a val-only seed stream, avoiding training
        prompts; a task with too few distinct rows tops up with distinct training prompts (with a
        warning), and gives fewer rows if even that runs out -- never the same prompt twice."""
        task = get_task(name)
        if self.num_val == 0:
            return []
        unseen: dict[str, dict[str, Any]] = {}
        seen: dict[str, dict[str, Any]] = {}
        chunk = max(4 * self.num_val, 64)
        for attempt in range(8):
            for row in task.generate(chunk, _derive_seed(self.seed, "val", name, str(attempt))):
                (seen if row["prompt"] in exclude else unseen).setdefault(row["prompt"], row)
                if len(unseen) == self.num_val:
                    return list(unseen.values())
        rows = list(unseen.values()) + list(seen.values())[: self.num_val - len(unseen)]
        rank_zero_warn(
            f"builtin:{name}: only {len(unseen)} distinct validation prompts are disjoint from the training rows; "
            f"{len(rows) - len(unseen)} validation rows repeat training prompts and {self.num_val - len(rows)} "
            "could not be made (the task has few distinct rows)"
        )
        return rows

    # -- tokenization ------------------------------------------------------------------------

    def _init_encoder(self) -> None:
        tok = self._require_tokenizer()
        if getattr(self, "_encoder_for", None) is tok:
            return
        # Special tokens the tokenizer adds in front of plain text (e.g. BOS), never at the end.
        with_special = tok("x")["input_ids"]
        without = tok("x", add_special_tokens=False)["input_ids"]
        start = next(
            (i for i in range(len(with_special) - len(without) + 1) if with_special[i:i + len(without)] == without), 0
        )
        self._special_prefix = list(with_special[:start])
        vocab = tok.get_vocab()
        self._end_of_turn = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        if tok.eos_token_id is not None:
            self._end_of_turn.add(int(tok.eos_token_id))
        self._encoder_for = tok

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _conversation(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """Messages of a row: system prompt first (if set), trailing non-assistant turns dropped."""
        if "messages" in row:
            msgs = [dict(m) for m in row["messages"]]
        else:
            msgs = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row.get("response", "")},
            ]
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
        return msgs

    def _encode_chat(self, row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        msgs = self._conversation(row)
        targets = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m["content"].strip()]
        if not targets:
            return None
        full = self._ids(self._render(msgs, add_generation_prompt=False))
        labels = [IGNORE_INDEX] * len(full)
        for i in targets:
            before = self._ids(self._render(msgs[:i], add_generation_prompt=True))
            after = full if i == len(msgs) - 1 else self._ids(self._render(msgs[: i + 1], add_generation_prompt=False))
            for part, what in ((before, "with the generation prompt"), (after, "through that turn")):
                if full[: len(part)] != part:
                    raise DataError(
                        f"{row.get('source', 'row')}: chat template is not prefix-consistent: the tokens of the "
                        f"conversation up to assistant turn {i} ({what}) are not a prefix of the full "
                        "conversation's tokens, so the prompt cannot be masked exactly. Use "
                        "use_chat_template=False or a template that renders earlier turns identically."
                    )
            start, end = len(before), len(after)
            eot = [k for k in range(start, end) if full[k] in self._end_of_turn]
            if eot:
                end = eot[-1] + 1  # keep the end-of-turn token, mask the template's separator after it
            labels[start:end] = full[start:end]
        return full, labels

    def _plain_parts(self, row: dict[str, Any]) -> list[tuple[str, bool]]:
        """``(text, trained)`` parts of the plain (template-free) format; the last part is the
        last response (``messages`` rows: trailing non-assistant turns are dropped)."""
        parts: list[tuple[str, bool]] = []
        if "messages" in row:
            msgs = [dict(m) for m in row["messages"]]
            while msgs and msgs[-1]["role"] != "assistant":
                msgs.pop()
            if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    if i > 0 and msgs[i - 1]["role"] == "assistant":
                        parts.append(("\n", False))
                    parts.append((m["content"], bool(m["content"].strip())))
                elif m["role"] == "system":
                    parts.append(((parts and parts[-1][1] and "\n" or "") + m["content"] + "\n\n", False))
                else:
                    parts.append(((parts and parts[-1][1] and "\n" or "") + m["content"] + "\n", False))
        else:
            head = f"{self.system_prompt}\n\n" if self.system_prompt is not None else ""
            parts.append((head + row["prompt"] + "\n", False))
            parts.append((row["response"], bool(row["response"].strip())))
        return parts

    def _plain_ids(self, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Tokenize plain parts: special prefix (e.g. BOS), consecutive masked parts merged and
        tokenized together, each trained part tokenized on its own (+ EOS if ``add_eos``)."""
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is None:
            raise DataError("add_eos=True but the tokenizer has no eos_token")
        ids: list[int] = list(self._special_prefix)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        masked_text = ""
        for text, trained in [*parts, ("", True)]:  # sentinel flushes the masked tail
            if not trained:
                masked_text += text
                continue
            if masked_text:
                seg = self._ids(masked_text)
                ids += seg
                labels += [IGNORE_INDEX] * len(seg)
                masked_text = ""
            if text:
                seg = self._ids(text) + ([int(eos)] if self.add_eos else [])
                ids += seg
                labels += seg
        return ids, labels

    def _encode_plain(self, row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        parts = self._plain_parts(row)
        if not any(trained for _, trained in parts):
            return None
        return self._plain_ids(parts)

    def _tokenize(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, list[int]]], dict[str, int]]:
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats["rows_in"] = len(rows)
        encode = self._encode_chat if self.chat else self._encode_plain
        kept, features = [], []
        for row in rows:
            encoded = encode(row)
            if encoded is None:
                stats["skipped_empty_response"] += 1
                continue
            ids, labels = encoded
            if len(ids) > self.max_length:
                if self.truncation == "drop":
                    stats["skipped_too_long"] += 1
                    continue
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                if all(label == IGNORE_INDEX for label in labels):
                    stats["skipped_truncated"] += 1
                    continue
                stats["truncated"] += 1
            n_target = sum(label != IGNORE_INDEX for label in labels)
            if n_target == 0:  # e.g. a template that renders the response away
                stats["skipped_empty_response"] += 1
                continue
            stats["rows"] += 1
            stats["tokens"] += len(ids)
            stats["target_tokens"] += n_target
            kept.append(row)
            features.append({"input_ids": ids, "labels": labels})
        return kept, features, stats

    def _warn(self, split: str, stats: dict[str, int]) -> None:
        problems = {
            k: stats[k]
            for k in ("truncated", "skipped_empty_response", "skipped_truncated", "skipped_too_long")
            if stats[k]
        }
        if problems:
            details = ", ".join(f"{k}={v}" for k, v in problems.items())
            rank_zero_warn(
                f"SFTDataModule {split} split: {details} (of {stats['rows_in']} rows; {stats['rows']} kept; "
                f"max_length={self.max_length}, truncation={self.truncation!r})"
            )
