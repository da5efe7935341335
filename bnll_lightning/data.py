"""The Lightning data module: rows loaded, split, corrupted, tokenized, mixed and packed once, then batched.

Forms of rows: :mod:`bnll_lightning.sources`; formatting and masking: :mod:`bnll_lightning.formatting`;
batches: :mod:`bnll_lightning.packing`."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from bnll_lightning import tasks as _tasks
from bnll_lightning.formatting import Formatter
from bnll_lightning.models import load_tokenizer
from bnll_lightning.packing import Collator, PackedDataset, TokenizedDataset
from bnll_lightning.sampling import ResumableDataLoader, ResumableSampler
from bnll_lightning.sources import DataError, Source, load_rows, read_hub, resolve_entries
from bnll_lightning.tasks import Task, get_task

__all__ = ["SFTDataModule"]


def _derive_seed(seed: int, *tags: str) -> int:
    """A stable 63-bit seed from ``seed`` and tags (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join([str(int(seed)), *tags]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data: built-in tasks, local files or hub datasets, tokenized once in ``setup``
    with prompt masking (forms: :mod:`bnll_lightning.sources`; masking: :mod:`bnll_lightning.formatting`)."""

    def __init__(
        self,
        train: str | list[str | dict[str, Any]] = "builtin:sort",
        val: str | list[str | dict[str, Any]] | None = None,
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
        weight_column: str = "weight",
        packing: bool = False,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            train: Training data: ``builtin:<task>`` (tasks: sort, reverse, add, figlet, capital,
                uppercase, plural), a local .jsonl/.json/.parquet/.csv file, glob or directory,
                or a Hugging Face hub dataset ``name[:config]``; comma-separate to combine. Or a
                list of sources, each a string or ``{path, proportion, name}``: with proportions
                (relative, all or none) the training set keeps its size (the sources' rows
                together) but each source fills its share, repeating rows or taking a seeded
                subset. Rows per source are logged as ``data/rows/<name>``.
            val: Validation data, same forms (no proportions). None: built-in tasks draw ``num_val``
                fresh rows from a separate seed stream (disjoint from train when the task allows
                it); file/hub rows are split off train (``val_fraction``, seeded). With several
                sources, ``val/<name>/*`` is logged per source besides ``val/*`` over all.
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
            weight_column: Field of a row's training weight (a number >= 0, default 1): the loss is
                the weight-weighted mean over target tokens, so weight 2 counts a row twice and 0
                drops it. Validation ignores weights.
            packing: Concatenate training rows (whole, best-fit) into sequences of ``max_length``
                tokens with position ids restarting at each row, so no attention crosses rows and
                no compute goes to padding. Batches then hold ``batch_size`` packed sequences.
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
        self.weight_column = weight_column
        self.packing = packing
        self.tokenizer = None
        self.stats: dict[str, dict[str, int]] = {}
        #: Training rows each source contributed (after mixing), by source name.
        self.source_rows: dict[str, int] = {}
        #: Names of the validation sources when there are several (``batch["source"]`` indexes them).
        self.val_sources: list[str] = []
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._datasets: dict[str, Dataset] = {}
        self._ready = False
        self._splits: Any = None  # the rows read (train and val, each with its source indices): see read()
        self._formatter: tuple[tuple, Formatter] | None = None
        self._train_entries = resolve_entries(train, "train")
        self._val_entries = resolve_entries(val, "val") if val is not None else None
        self._train_sources = [src for e in self._train_entries for src in e.sources]
        self._val_sources = [src for e in self._val_entries for src in e.sources] if val is not None else None
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
    def formatter(self) -> Formatter:
        """Formats and tokenizes rows with the current tokenizer and settings (rebuilt when they change)."""
        settings = (self._require_tokenizer(), self.system_prompt, self.use_chat_template, self.add_eos)
        if self._formatter is None or self._formatter[0] != settings:  # the tokenizer compares by identity
            self._formatter = (settings, Formatter(*settings))
        return self._formatter[1]

    @property
    def chat(self) -> bool:
        """Whether rows are formatted with the tokenizer's chat template."""
        return self.formatter.chat

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
                    read_hub(src.name, src.config, split, max_rows=1)

    def read(self) -> None:
        """Read and check every source's rows (no tokenizer needed), once: a data error shows before a model
        is loaded (the CLI calls this first). ``setup`` calls it if nobody has."""
        if self._splits is None:
            self._splits = self._load_splits()

    def use_rows_of(self, other: SFTDataModule) -> None:
        """Take the rows ``other``, a data module of the same settings, has read (instead of reading them again)."""
        def settings(module: SFTDataModule) -> dict[str, Any]:  # LightningCLI adds "_instantiator"
            return {k: v for k, v in module.hparams.items() if not k.startswith("_")}

        if other._splits is not None and settings(other) == settings(self):
            self._splits = other._splits

    def setup(self, stage: str | None = None) -> None:
        """Load, split, corrupt (``noise``), tokenize, mix and pack once; cached afterwards."""
        if self._ready:
            return
        tok = self._require_tokenizer()
        if self.use_chat_template and not getattr(tok, "chat_template", None):
            rank_zero_warn("use_chat_template=True but the tokenizer has no chat template: using plain formatting")
        self.read()
        (train_rows, train_tags), (val_rows, val_tags) = self._splits
        noisy = 0
        if self.noise > 0:
            train_rows = _tasks.noise(train_rows, self.noise, _derive_seed(self.seed, "noise"))
            noisy = sum(bool(r.get("noisy")) for r in train_rows)
        # Unweighted data carries no weight tensor at all, so its loss is the plain mean, not one weighted by ones.
        weighted, fmt = any("weight" in r for r in train_rows), self.formatter
        kept, features, self.stats["train"] = fmt.tokenize(train_rows, self.max_length, self.truncation, weighted)
        self.stats["train"]["noisy"] = noisy
        rows, features = self._mix([train_tags[i] for i in kept], [train_rows[i] for i in kept], features)
        self._rows["train"] = rows
        dataset = PackedDataset(features, self.max_length) if self.packing else TokenizedDataset(features)
        self._datasets["train"] = dataset

        kept, val_features, self.stats["val"] = fmt.tokenize(val_rows, self.max_length, self.truncation)
        self.stats["val"]["noisy"] = 0
        self._rows["val"] = [val_rows[i] for i in kept]
        tags = [val_tags[i] for i in kept]
        present = sorted(set(tags))
        entries = self._val_entries or self._train_entries
        self.val_sources = [entries[k].name for k in present] if len(present) > 1 else []
        if self.val_sources:
            for feature, tag in zip(val_features, tags):
                feature["source"] = present.index(tag)
        self._datasets["val"] = TokenizedDataset(val_features)
        for split in ("train", "val"):
            self._warn(split, self.stats[split])
        if not features:
            raise DataError(f"no usable training rows in {self.train!r} (stats: {self.stats['train']})")
        self._ready = True

    def _mix(
        self, tags: list[int], rows: list[dict[str, Any]], features: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The training set in the sources' proportions (as it is without proportions): as many rows
        as the sources hold together, shares by largest remainder, each source's rows drawn in seeded
        rounds without replacement (every row once before any row twice). Sets ``source_rows``."""
        entries = self._train_entries
        by_source = [[i for i, t in enumerate(tags) if t == k] for k in range(len(entries))]
        if entries[0].proportion is not None:
            total = sum(e.proportion for e in entries)
            shares = [e.proportion / total * len(tags) for e in entries]
            counts = [int(x) for x in shares]
            for k in sorted(range(len(entries)), key=lambda k: counts[k] - shares[k])[: len(tags) - sum(counts)]:
                counts[k] += 1
            for k, (entry, n) in enumerate(zip(entries, counts)):
                if n and not by_source[k]:
                    raise DataError(f"data.train: source {entry.name!r} has a proportion but no usable rows")
                rng, draw = random.Random(_derive_seed(self.seed, "mix", entry.name)), []
                while len(draw) < n:
                    draw += rng.sample(by_source[k], len(by_source[k]))
                by_source[k] = draw[:n]
            order = [i for picked in by_source for i in picked]
            rows, features = [rows[i] for i in order], [features[i] for i in order]
        self.source_rows = {e.name: len(picked) for e, picked in zip(entries, by_source)}
        return rows, features

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
            generator=self._loader_generator("train"),
        )

    def _loader_generator(self, split: str) -> torch.Generator:
        """A loader's own generator: each new iterator draws a worker seed from it, which would otherwise
        come from the global one that dropout draws from, at points (an epoch's or a validation's start)
        that a resumed run does not pass through where the checkpoint was written."""
        return torch.Generator().manual_seed(_derive_seed(self.seed, "loader", split))

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
            generator=self._loader_generator("val"),
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
        """Canonical un-tokenized rows of ``split``, aligned 1:1 with its rows' features (skipped rows
        are excluded; the packed train dataset's items are packs of them): ``prompt``/``response`` or
        ``messages``, plus ``answer``, ``task``, ``noisy``, ``weight``, ``source`` when known. For
        generation-based evaluation use :meth:`encode_prompt` on them and
        ``get_task(row["task"]).check(prediction, row)``."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.setup()
        return [dict(row) for row in self._rows[split]]

    def format_prompt(self, row: dict[str, Any] | str) -> str:
        """The text a model sees before generating the (last) response of ``row``, formatted exactly as
        in training (see :meth:`bnll_lightning.formatting.Formatter.format_prompt`)."""
        return self.formatter.format_prompt(row)

    def encode_prompt(self, row: dict[str, Any] | str) -> list[int]:
        """Token ids of :meth:`format_prompt`; identical to the masked prefix of the training row."""
        return self.formatter.encode_prompt(row)

    # -- loading and splitting ---------------------------------------------------------------

    def _load_splits(self) -> tuple[tuple[list[dict[str, Any]], list[int]], tuple[list[dict[str, Any]], list[int]]]:
        """(rows, source index of each row) of train and of val; val indexes ``val``'s sources, or
        ``train``'s when val is split off or generated."""
        train_rows, train_tags, val_rows, val_tags = [], [], [], []
        builtin_train: list[tuple[int, Source]] = []
        for k, entry in enumerate(self._train_entries):
            for src in entry.sources:
                if src.kind == "builtin":
                    builtin_train.append((k, src))
                    rows = get_task(src.name).generate(self.num_train, _derive_seed(self.seed, "train", src.name))
                else:
                    rows = load_rows(src, self.train_split, self.max_rows, self.weight_column)
                    if self._val_entries is None:
                        rows, held_out = self._split(rows, src.name)
                        val_rows += held_out
                        val_tags += [k] * len(held_out)
                train_rows += rows
                train_tags += [k] * len(rows)
        train_prompts = {r["prompt"] for r in train_rows if "prompt" in r}
        # val's own sources; without them, fresh rows of train's built-in tasks (file rows were split off above)
        val_from = builtin_train if self._val_entries is None else [
            (k, src) for k, entry in enumerate(self._val_entries) for src in entry.sources]
        for k, src in val_from:
            if src.kind == "builtin":
                rows = self._builtin_val(src.name, train_prompts)
            else:
                rows = load_rows(src, self.val_split, self.max_rows, self.weight_column)
            val_rows += rows
            val_tags += [k] * len(rows)
        _warn_duplicates(train_rows, val_rows)
        return (train_rows, train_tags), (val_rows, val_tags)

    def _split(self, rows: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Seeded, disjoint hold-out of ``round(val_fraction * n)`` rows (>= 1 when the fraction is
        positive and n >= 2); both parts keep file order. The split depends on the seed, the
        file's base name and its rows, not on where the file lives."""
        # Not datasets' train_test_split: that needs the rows as one Arrow table (one type per column) and
        # returns them shuffled; a seeded permutation of indices does the job and keeps file order.
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

    def _warn(self, split: str, stats: dict[str, int]) -> None:
        problems = {
            k: stats[k]
            for k in ("truncated", "skipped_empty_response", "skipped_truncated", "skipped_too_long",
                      "dropped_trailing_turns")
            if stats[k]
        }
        if problems:
            details = ", ".join(f"{k}={v}" for k, v in problems.items())
            rank_zero_warn(
                f"SFTDataModule {split} split: {details} (of {stats['rows_in']} rows; {stats['rows']} kept; "
                f"max_length={self.max_length}, truncation={self.truncation!r})"
            )
