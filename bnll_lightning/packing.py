"""Features -> batches: in-memory datasets, best-fit packing with restarting position ids, padding collation.

Batches (:class:`Collator`) are ``{"input_ids", "attention_mask", "labels"}`` LongTensors of shape
``[B, T]``, right padded; ``labels`` follow the Hugging Face convention: same positions as
``input_ids`` (NOT shifted), ``-100`` on prompt/template/padding tokens. Only when the data has
them: ``weights`` (float32 ``[B, T]``, each token its row's weight, 0 on padding), ``position_ids``
(packed rows: restarting at 0 at each row) and ``source`` (``[B]``, a validation row's source index).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from bnll_lightning.modes import eval_mode
from bnll_lightning.objectives import IGNORE_INDEX
from bnll_lightning.streaming import forward_hidden

__all__ = ["Collator", "PackedDataset", "TokenizedDataset", "pack", "packing_unsupported_reason"]


class TokenizedDataset(Dataset):
    """In-memory list of ``{"input_ids": list[int], "labels": list[int]}`` features."""

    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` grouped into bins of at most ``capacity``
    tokens, each row whole, longest rows first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(k)
        bins[b].append(i)
        if room > lengths[i]:
            bisect.insort(free, (room - lengths[i], b))
    return bins


class PackedDataset(Dataset):
    """Rows packed into sequences of at most ``max_length`` tokens (:func:`pack`), built on access
    from the row features (nothing copied); ``position_ids`` restart at 0 at each row, and each row's
    first label is masked: unpacked, nothing predicts a row's first token, and packed, the previous
    row's last position would be trained to."""

    def __init__(self, features: list[dict[str, Any]], max_length: int):
        self.features = features
        self.packs = pack([len(f["input_ids"]) for f in features], max_length)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list]:
        rows = [self.features[i] for i in self.packs[index]]
        out = {"input_ids": [x for r in rows for x in r["input_ids"]],
               "labels": [x for r in rows for x in [IGNORE_INDEX, *r["labels"][1:]]]}
        out["position_ids"] = [t for r in rows for t in range(len(r["input_ids"]))]
        if "weight" in rows[0]:
            out["weight"] = [r["weight"] for r in rows for _ in r["input_ids"]]
        return out


@dataclass
class Collator:
    """Right-pad features to the batch's longest row (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` (``pad_token_id`` on padding), ``attention_mask`` (0 on padding) and
    ``labels`` (-100 on padding), all ``torch.long`` of shape ``[B, T]``; and, when the features
    have them, float32 ``weights`` ``[B, T]`` (from each feature's ``weight``, a number or one per
    token; 0 on padding), ``position_ids`` ``[B, T]`` (on padding its column index: padding comes
    after every row, so causal attention never reads it) and ``source`` ``[B]``. Picklable, so it
    works with ``num_workers > 0``.
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        first = features[0]
        if "weight" in first:
            batch["weights"] = torch.zeros((len(features), width), dtype=torch.float32)
        if "position_ids" in first:
            batch["position_ids"] = torch.arange(width).repeat(len(features), 1)
        if "source" in first:
            batch["source"] = torch.tensor([f["source"] for f in features], dtype=torch.long)
        for i, (feat, n) in enumerate(zip(features, lengths)):
            input_ids[i, :n] = torch.as_tensor(feat["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(feat.get("labels", feat["input_ids"]), dtype=torch.long)
            if "weights" in batch:
                batch["weights"][i, :n] = torch.as_tensor(feat["weight"], dtype=torch.float32)
            if "position_ids" in batch:
                batch["position_ids"][i, :n] = torch.as_tensor(feat["position_ids"], dtype=torch.long)
        return batch


@torch.no_grad()
def packing_unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if ``model`` keeps packed rows apart (position ids restarting at a row, no attention mask):
    the hidden states of a row packed after another equal those of the row alone; else why not."""
    emb = model.get_input_embeddings()
    ids = torch.randint(0, emb.num_embeddings, (1, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(emb.weight.device)
    with eval_mode(model):
        packed = forward_hidden(model, ids, None, position_ids=torch.arange(8, device=ids.device)[None] % 5)
        alone = forward_hidden(model, ids[:, 5:], torch.ones_like(ids[:, 5:]))
    err = (packed[:, 5:].float() - alone.float()).abs().max().item()
    tol = 1e-4 if packed.dtype == torch.float32 else 2**-5
    return None if err <= tol * (1 + alone.float().abs().max().item()) else (
        f"a row packed after another differs from the row alone by {err:.3g}: attention crosses rows")
