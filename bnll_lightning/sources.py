"""Where rows come from: source specs, file and hub readers, row validation and normalisation.

Sources (``train`` / ``val`` of :class:`~bnll_lightning.data.SFTDataModule`, comma-separated lists allowed):

* ``builtin:<task>`` - rows generated offline by :mod:`bnll_lightning.tasks`;
* a local file, glob or directory: ``.jsonl``, ``.json``, ``.parquet``, ``.csv``;
* anything else is a Hugging Face hub dataset name, ``name`` or ``name:config``
  (``datasets.load_dataset(name, config, split=...)``); ``hub:name`` forces the hub.

Rows are ``{"prompt": str, "response": str}`` (``completion`` is accepted for ``response``; a
conversational ``prompt``/``completion`` pair of message lists is turned into ``messages``) or
``{"messages": [{"role": ..., "content": ...}, ...]}``. Optional ``answer`` / ``task`` /
``noisy`` fields are carried along for evaluation; an optional numeric ``weight`` (default 1, column
``weight_column``) scales the row's share of the training loss.

A list gives sources apart: ``[{"path": ..., "proportion": ..., "name": ...}, ...]`` (or plain
strings); each is logged, mixed and validated as its own source (see ``SFTDataModule``).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bnll_lightning.tasks import TASKS, get_task

__all__ = ["DataError", "Entry", "Source", "load_rows", "normalize_row", "read_hub", "resolve_entries",
           "resolve_sources"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Roles chat templates know; anything else (ShareGPT's "human"/"gpt", "bot") would never be trained on.
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(ValueError):
    """A problem with the data (malformed file, missing field, template not prefix-consistent)."""


@dataclass(frozen=True)
class Source:
    kind: Literal["builtin", "file", "hub"]
    name: str  # task name, file path or hub dataset name
    config: str | None = None


@dataclass(frozen=True)
class Entry:
    """One source as the config names it (a comma item or a list entry; a glob or directory is one)."""

    name: str  # in metric names: data/rows/<name>, val/<name>/...
    sources: tuple[Source, ...]
    proportion: float | None = None


def _source_name(spec: str) -> str:
    """A short metric-safe name: the task, file stem, directory or hub dataset name."""
    base = spec.split(":", 1)[1] if spec.startswith(("builtin:", "hub:")) else spec
    base = base.rstrip("/").rsplit("/", 1)[-1]
    if Path(base).suffix.lower() in FILE_SUFFIXES:
        base = Path(base).stem
    return re.sub(r"[^\w.-]+", "_", base).strip("_") or "source"


def resolve_entries(spec: str | list[str | dict[str, Any]], field: str = "train") -> list[Entry]:
    """Parse ``data.train`` / ``data.val``: a comma-separated string or a list of strings and
    ``{"path", "proportion", "name"}`` dicts. Proportions are all given or none (train only)."""
    items = spec if isinstance(spec, (list, tuple)) else [i for i in str(spec).split(",") if i.strip()]
    if not items:
        raise DataError(f"data.{field}: empty data source {spec!r}")
    entries = []
    for item in items:
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "proportion", "name"}:
            raise DataError(f"data.{field}: a source is a string or {{path, proportion, name}}, got {item!r}")
        share = item.get("proportion")
        if share is not None and (field != "train" or isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not (math.isfinite(share) and share > 0)):
            raise DataError(f"data.{field}: proportion of {item['path']!r} must be a number > 0 (train only), "
                            f"got {share!r}")  # fmt: skip
        path = str(item["path"]).strip()
        name = re.sub(r"[^\w.-]+", "_", str(item.get("name") or _source_name(path)))
        entries.append(Entry(name, tuple(resolve_sources(path)), None if share is None else float(share)))
    names = [e.name for e in entries]
    if len(set(names)) < len(names):
        raise DataError(f"data.{field}: two sources share a name ({names}); give them distinct `name`s")
    if len({e.proportion is None for e in entries}) > 1:
        raise DataError(f"data.{field}: give every source a proportion, or none")
    return entries


def resolve_sources(spec: str) -> list[Source]:
    """Parse a source string (see the module docstring) into sources; local files are expanded."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise DataError(f"empty data source {spec!r}")
    out: list[Source] = []
    for item in items:
        if item.startswith("builtin:"):
            name = item[len("builtin:"):].strip()
            try:
                get_task(name)
            except KeyError as err:
                raise DataError(str(err.args[0])) from None
            out.append(Source("builtin", name))
            continue
        if item.startswith("hub:"):
            out.append(_hub_source(item[len("hub:"):]))
            continue
        expanded = os.path.expanduser(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if _is_data_file(Path(p)))
            if not matches:
                raise DataError(f"no {'/'.join(FILE_SUFFIXES)} file matches {item!r}")
            out.extend(Source("file", p) for p in matches)
            continue
        path = Path(expanded)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_data_file(p))
            if not files:
                raise DataError(f"directory {item!r} holds no {'/'.join(FILE_SUFFIXES)} file")
            out.extend(Source("file", str(p)) for p in files)
        elif path.is_file():
            if not _is_data_file(path):
                raise DataError(f"unsupported file type {path.suffix!r} for {item!r}; use {', '.join(FILE_SUFFIXES)}")
            out.append(Source("file", str(path)))
        elif path.suffix.lower() in FILE_SUFFIXES or item.startswith((".", "/", "~")):
            raise DataError(f"data file not found: {item!r}")
        else:
            out.append(_hub_source(item))
    return out


def _is_data_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in FILE_SUFFIXES


def _hub_source(item: str) -> Source:
    name, _, config = item.partition(":")
    return Source("hub", name.strip(), config.strip() or None)


# Hand-written readers, not datasets.load_dataset: they name the file and line (or row) of every problem.
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


def read_hub(name: str, config: str | None, split: str, max_rows: int | None) -> tuple[list[Any], list[str]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except (OSError, ValueError) as err:  # not found, offline, unknown config or split: a data error
        raise DataError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub: {err}. "
            f"(It is not a local file nor builtin:<task>; valid tasks: {', '.join(sorted(TASKS))}.)"
        ) from err
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = ds.to_list()
    label = f"{name}{':' + config if config else ''}[{split}]"
    return rows, [f"{label}: row {i}" for i in range(len(rows))]


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


def _weight(value: Any, where: str, column: str, text_cells: bool = False) -> float:
    """A row's weight: a finite number >= 0. ``text_cells`` (CSV, where every cell is text): numeric text counts;
    elsewhere a string is an error, since a file that quotes its weights may hold other mistakes."""
    number = value
    if isinstance(value, str) and not text_cells:
        raise DataError(f"{where}: field {column!r} must be a number, got the string {value!r} (write it unquoted)")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (math.isfinite(number) and number >= 0):
        raise DataError(f"{where}: field {column!r} must be a finite number >= 0, got {value!r}")
    return float(number)


def normalize_row(row: Any, where: str, weight_column: str = "weight", text_cells: bool = False) -> dict[str, Any]:
    """Validate one raw row and return its canonical form (a new dict).

    Canonical forms: ``{"prompt": str, "response": str, ...}`` or ``{"messages": [...], ...}``,
    plus ``answer`` / ``task`` / ``noisy`` (and ``answer_span`` for prompt/response rows) when present, ``weight`` (float, from ``weight_column``;
    absent when the row has none, null or empty) and ``source`` (= ``where``).
    A null response becomes ``""`` (skipped later as empty). Raises :class:`DataError` naming
    the missing/invalid field and ``where`` (file and row index). ``text_cells``: the file's cells are all
    text (CSV), so a numeric text weight counts.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    out: dict[str, Any] = {k: row[k] for k in ("answer", "task", "noisy") if row.get(k) is not None}
    if row.get(weight_column) not in (None, ""):
        out["weight"] = _weight(row[weight_column], where, weight_column, text_cells)
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
    if row.get("answer_span") is not None:  # where a self-phrased response states its answer (label noise swaps it)
        span = row["answer_span"]
        if not (isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span)
                and 0 <= span[0] < span[1] <= len(response)):
            raise DataError(f"{where}: field 'answer_span' must be [start, end] inside the response, got {span!r}")
        out["answer_span"] = span
    return out


def load_rows(
    source: Source, split: str = "train", max_rows: int | None = None, weight_column: str = "weight"
) -> list[dict[str, Any]]:
    """Canonical rows of one file or hub source (see :func:`normalize_row`)."""
    if source.kind == "file":
        rows, where = _READERS[Path(source.name).suffix.lower()](source.name)
        if max_rows is not None:
            rows, where = rows[:max_rows], where[:max_rows]
    elif source.kind == "hub":
        rows, where = read_hub(source.name, source.config, split, max_rows)
    else:
        raise ValueError(f"load_rows does not handle {source.kind} sources")
    text_cells = source.kind == "file" and Path(source.name).suffix.lower() == ".csv"
    return [normalize_row(row, w, weight_column, text_cells) for row, w in zip(rows, where)]
