"""Mixtures: sources with proportions, rows per source in the log, validation read per source."""

from __future__ import annotations

import collections
import json

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule
from bnll_lightning.sources import DataError, resolve_entries


def write_rows(path, tag: str, n: int) -> str:
    items = [{"prompt": f"{tag} {i}?", "response": " ".join([tag] * (1 + i % 5))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def prompts(dm: SFTDataModule) -> list[str]:
    return [r["prompt"] for r in dm.raw_rows("train")]


def test_sources_parse_from_strings_and_lists(tmp_path):
    a, b = write_rows(tmp_path / "a.jsonl", "a", 2), write_rows(tmp_path / "b.jsonl", "b", 2)
    assert [(e.name, e.proportion) for e in resolve_entries(f"{a}, builtin:sort")] == [("a", None), ("sort", None)]
    entries = resolve_entries([{"path": a, "proportion": 3}, {"path": b, "proportion": 1, "name": "my b"}])
    assert [(e.name, e.proportion, e.sources[0].name) for e in entries] == [("a", 3.0, a), ("my_b", 1.0, b)]
    assert [e.name for e in resolve_entries(["hub:user/data:cfg", str(tmp_path)])] == ["data_cfg", tmp_path.name]
    for spec, match in [
        ([{"path": a, "proportion": 1}, b], "every source a proportion, or none"),
        ([{"path": a, "proportion": 0}], "must be a number > 0"),
        ([{"path": a, "proportion": True}], "must be a number > 0"),
        ([{"path": a, "share": 1}], r"a string or \{path, proportion, name\}"),
        ([a, {"path": b, "name": "a"}], "share a name"),
        ([], "empty data source"),
    ]:
        with pytest.raises(DataError, match=match):
            resolve_entries(spec)
    with pytest.raises(DataError, match=r"data\.val: proportion .* \(train only\)"):
        SFTDataModule(train=a, val=[{"path": b, "proportion": 1}])


def test_mixture_follows_the_proportions(tmp_path, tokenizer):
    a, b = write_rows(tmp_path / "a.jsonl", "a", 30), write_rows(tmp_path / "b.jsonl", "b", 6)

    def mixed(seed=0, **kwargs):
        dm = SFTDataModule(train=[{"path": a, "proportion": 2}, {"path": b, "proportion": 1}], val_fraction=0.0,
                           seed=seed, tokenizer=tokenizer, **kwargs)
        dm.setup()
        return dm

    dm = mixed()
    # 36 rows in all, 2 : 1: the large source is subsampled (24 of 30), the small one repeated (6 rows x 2).
    assert dm.source_rows == {"a": 24, "b": 12} and len(dm.train_dataset) == 36
    counts = collections.Counter(prompts(dm))
    assert sum(p.startswith("a") for p in counts) == 24 and all(counts[p] == 1 for p in counts if p.startswith("a"))
    assert {p: n for p, n in counts.items() if p.startswith("b")} == {f"b {i}?": 2 for i in range(6)}
    assert prompts(mixed()) == prompts(dm)  # a function of the seed: a resumed run sees the same data
    assert prompts(mixed(seed=1)) != prompts(dm)
    # Largest remainder: 0.7 x 36 = 25.2 and 0.3 x 36 = 10.8 give 25 and 11.
    dm = SFTDataModule(train=[{"path": a, "proportion": 0.7}, {"path": b, "proportion": 0.3}], val_fraction=0.0,
                       tokenizer=tokenizer)
    dm.setup()
    assert dm.source_rows == {"a": 25, "b": 11}


def test_without_proportions_the_training_set_is_unchanged(tmp_path, tokenizer):
    a, b = write_rows(tmp_path / "a.jsonl", "a", 5), write_rows(tmp_path / "b.jsonl", "b", 3)
    features = []
    for train in (f"{a},{b}", [a, b], [{"path": a}, {"path": b}]):
        dm = SFTDataModule(train=train, val_fraction=0.0, tokenizer=tokenizer)
        dm.setup()
        features.append(dm.train_dataset.features)
        assert dm.source_rows == {"a": 5, "b": 3} and prompts(dm)[:2] == ["a 0?", "a 1?"]
    assert features[0] == features[1] == features[2]


def test_validation_is_read_per_source_and_rows_per_source_are_logged(tmp_path, tokenizer, tiny_model_dir):
    a, b = write_rows(tmp_path / "a.jsonl", "a", 12), write_rows(tmp_path / "b.jsonl", "b", 8)
    module = SFTModule(model=tiny_model_dir, histogram_every_n_steps=0, export_dir=str(tmp_path / "export"))
    dm = SFTDataModule(train=[{"path": a, "proportion": 1}, {"path": b, "proportion": 1}], val_fraction=0.25,
                       batch_size=4, tokenizer=module.tokenizer)
    dm.setup()
    assert dm.val_sources == ["a", "b"] and dm.source_rows == {"a": 8, "b": 7}  # 9 + 6 rows after the split
    val = dm.val_dataset.features
    assert [f["source"] for f in val] == [0] * 3 + [1] * 2
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "data/rows/a" in logged and "data/rows/b" in logged

    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    targets = [sum(sum(t != -100 for t in f["labels"][1:]) for f in val if f["source"] == k) for k in (0, 1)]
    for what in ("nll", "mean_p", "token_accuracy"):
        per_source = [metrics[f"val/{name}/{what}"] for name in ("a", "b")]
        pooled = sum(n * m for n, m in zip(targets, per_source)) / sum(targets)  # token-weighted
        assert metrics[f"val/{what}"] == pytest.approx(pooled, rel=1e-5)
    assert metrics["val/a/nll"] != metrics["val/b/nll"]


def test_one_validation_source_logs_as_before(tmp_path, tokenizer):
    dm = SFTDataModule(train=write_rows(tmp_path / "a.jsonl", "a", 8), val_fraction=0.25, tokenizer=tokenizer)
    dm.setup()
    assert dm.val_sources == [] and "source" not in dm.collate(dm.val_dataset.features)
    assert isinstance(dm.collate(dm.val_dataset.features)["labels"], torch.Tensor)
