"""Packing: best-fit bins, position ids restarting at each row, rows kept apart, the loss of the rows unpacked."""

from __future__ import annotations

import json

import pytest
import torch

from _exactness import one_step_trainer, sgd_lr1, step_of
from bnll_lightning.cli import main as cli_main
from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule, target_weights
from bnll_lightning.packing import packing_unsupported_reason
from bnll_lightning.objectives import (
    ASFT, DFT, EAFT, IGNORE_INDEX, NLL, AlphaFamily, Focal, NegProb, ThresholdedNLL, TokenAlpha, TopFraction,
)
from bnll_lightning.packing import PackedDataset, pack
from bnll_lightning.reference import load_reference
from bnll_lightning.streaming import forward_hidden

OBJECTIVES = {
    "NLL": NLL, "AlphaFamily": lambda: AlphaFamily(0.5), "NegProb": NegProb, "DFT": DFT, "Focal": Focal,
    "ThresholdedNLL": lambda: ThresholdedNLL(tau=2e-5), "TopFraction": lambda: TopFraction(0.3), "EAFT": EAFT,
    "ASFT": ASFT, "TokenAlpha": lambda: TokenAlpha(1.0, low=1e-6, high=1e-4),
    "TokenAlpha-entropy": lambda: TokenAlpha(signal="entropy"),
}  # fmt: skip


def write_rows(path, n: int = 7, weights: bool = False) -> str:
    """Rows of uneven lengths (1 to 25 words of response)."""
    items = [{"prompt": f"Say {i}.", "response": " ".join(["word"] * (1 + (5 * i) % 26))} for i in range(n)]
    if weights:
        items = [{**r, "weight": [1, 0.5, 2][i % 3]} for i, r in enumerate(items)]
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def write_assistant_only(path, n: int = 7) -> str:
    """Rows that are one assistant turn: formatted without a chat template (and a tokenizer that adds no
    BOS), a row's first token is a target."""
    items = [{"messages": [{"role": "assistant", "content": " ".join(["word"] * (1 + (5 * i) % 26))}]}
             for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def datamodule(path: str, tokenizer, **kwargs) -> SFTDataModule:
    kwargs.setdefault("max_length", 160)
    dm = SFTDataModule(train=path, val_fraction=0.0, tokenizer=tokenizer, **kwargs)
    dm.setup()
    return dm


def test_pack_is_best_fit_decreasing_and_keeps_rows_whole():
    lengths = [5, 3, 8, 2, 4, 1, 7]
    bins = pack(lengths, 10)
    # Longest first, each into the fullest bin it fits: 8+2, 7+3, 5+4+1 (30 tokens in 3 full bins).
    assert bins == [[2, 3], [6, 1], [0, 4, 5]]
    assert pack([], 10) == [] and pack([10, 10], 10) == [[0], [1]]


def test_packed_rows_restart_positions_and_keep_labels_and_weights(tmp_path, tokenizer):
    dm = datamodule(write_rows(tmp_path / "a.jsonl", weights=True), tokenizer, packing=True)
    data = dm.train_dataset
    assert isinstance(data, PackedDataset) and len(data) < len(data.features)  # rows shared sequences
    assert sorted(i for p in data.packs for i in p) == list(range(len(data.features)))  # each row once
    for k in range(len(data)):
        item, rows = data[k], [data.features[i] for i in data.packs[k]]
        assert len(item["input_ids"]) == sum(len(r["input_ids"]) for r in rows) <= dm.max_length
        assert item["input_ids"] == [t for r in rows for t in r["input_ids"]]
        assert item["labels"] == [t for r in rows for t in [IGNORE_INDEX, *r["labels"][1:]]]
        assert item["position_ids"] == [t for r in rows for t in range(len(r["input_ids"]))]
        assert item["weight"] == [r["weight"] for r in rows for _ in r["input_ids"]]
    batch = dm.collate([data[0], data[len(data) - 1]])
    n = int(batch["attention_mask"][1].sum())
    assert n < batch["input_ids"].shape[1]  # the shorter pack is padded
    assert batch["position_ids"][1, n:].tolist() == list(range(n, batch["input_ids"].shape[1]))
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["weights"][1, n:] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_keeps_packed_rows_apart_only_from_position_ids_without_a_mask(attn, tiny_model_dir):
    """What the installed transformers does for Llama, checked rather than assumed: position ids that
    restart and no attention mask give each row its own block-diagonal causal mask; with a mask of ones
    (or positions that do not restart) the second row attends to the first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    restart = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        alone = forward_hidden(model, ids[:, 5:], torch.ones(1, 7, dtype=torch.long))
        packed = forward_hidden(model, ids, None, position_ids=restart)
        masked = forward_hidden(model, ids, torch.ones_like(ids), position_ids=restart)
        running = forward_hidden(model, ids, None, position_ids=torch.arange(12)[None])
    torch.testing.assert_close(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked[:, 5:], alone, atol=1e-3)
    assert not torch.allclose(running[:, 5:], alone, atol=1e-3)
    assert packing_unsupported_reason(model) is None


@pytest.fixture(scope="module")
def shared_module(tiny_model_dir):
    return SFTModule(model=tiny_model_dir)


@pytest.mark.parametrize("name, weights", [(name, False) for name in sorted(OBJECTIVES)] + [
    (name, True) for name in ("NLL", "AlphaFamily", "ThresholdedNLL", "EAFT", "TokenAlpha-entropy")])
def test_packed_batch_has_the_loss_of_its_rows_unpacked(name, weights, tmp_path, tokenizer, tiny_model_dir,
                                                        shared_module):
    objective = OBJECTIVES[name]()
    if objective.requires.reference:
        objective.bind_reference(load_reference(objective, tiny_model_dir))
    module = shared_module
    module.objective = objective
    path = write_rows(tmp_path / "a.jsonl", weights=weights)
    packed_dm, plain_dm = (datamodule(path, tokenizer, packing=p) for p in (True, False))
    packed = packed_dm.collate([packed_dm.train_dataset[k] for k in range(len(packed_dm.train_dataset))])
    plain = plain_dm.collate(list(plain_dm.train_dataset.features))
    assert len(packed["input_ids"]) < len(plain["input_ids"])  # rows share sequences
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum()
    outs = {}
    for key, batch in (("packed", packed), ("plain", plain)):
        module.zero_grad(set_to_none=True)
        stats = module.target_stats(batch)._replace(weights=target_weights(batch))
        outs[key] = out = objective.from_stats(stats)
        out.loss.backward()
        outs[key + "_grad"] = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs["packed"].loss, outs["plain"].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["packed"].normalizer, outs["plain"].normalizer)
    for n, g in outs["plain_grad"].items():
        torch.testing.assert_close(outs["packed_grad"][n], g, rtol=1e-3, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["NLL", "AlphaFamily"])
def test_a_row_whose_first_token_is_a_target_is_not_predicted_from_the_row_before(name, tmp_path, tokenizer,
                                                                                  shared_module):
    """Unpacked, nothing predicts a row's first token; packed, the previous row's last position must not either."""
    path = write_assistant_only(tmp_path / "a.jsonl")
    packed_dm, plain_dm = (datamodule(path, tokenizer, packing=p, use_chat_template=False) for p in (True, False))
    assert all(f["labels"][0] == f["input_ids"][0] for f in plain_dm.train_dataset.features)  # first token: a target
    packed = packed_dm.collate([packed_dm.train_dataset[k] for k in range(len(packed_dm.train_dataset))])
    plain = plain_dm.collate(list(plain_dm.train_dataset.features))
    assert len(packed["input_ids"]) < len(plain["input_ids"])  # rows share sequences
    module = shared_module
    module.objective = objective = OBJECTIVES[name]()
    with torch.no_grad():
        out = {key: objective.from_stats(module.target_stats(batch)) for key, batch in
               (("packed", packed), ("plain", plain))}  # fmt: skip
    assert out["packed"].normalizer == out["plain"].normalizer  # the same target tokens, none across rows
    torch.testing.assert_close(out["packed"].loss, out["plain"].loss, rtol=1e-5, atol=1e-6)


def test_full_logits_path_and_the_head_eval_read_packed_batches(tmp_path, tokenizer, shared_module):
    path = write_rows(tmp_path / "a.jsonl")
    packed_dm, plain_dm = (datamodule(path, tokenizer, packing=p) for p in (True, False))
    packed = packed_dm.collate([packed_dm.train_dataset[k] for k in range(len(packed_dm.train_dataset))])
    plain = plain_dm.collate(list(plain_dm.train_dataset.features))
    module = shared_module
    module.objective = NLL()
    with torch.no_grad():
        for streamed in (False, True):
            module.head.streamed = streamed
            a, b = (module.head.eval(module.model, batch) for batch in (packed, plain))
            torch.testing.assert_close(a[0][a[1]].sort().values, b[0][b[1]].sort().values, rtol=1e-5, atol=1e-5)
            assert a[2][a[1]].sum() == b[2][b[1]].sum()
    module.head.streamed = True


@pytest.mark.parametrize("rows", ["prompt_response", "assistant_only"])
def test_a_packed_fit_step_equals_the_unpacked_one(rows, tmp_path, tokenizer, tiny_model_dir):
    path = (write_rows(tmp_path / "a.jsonl", weights=True) if rows == "prompt_response"
            else write_assistant_only(tmp_path / "a.jsonl"))
    steps = {}
    for packing in (True, False):
        module = SFTModule(model=tiny_model_dir, optimizer=sgd_lr1, warmup=0, export_dir=str(tmp_path / "export"))
        data = SFTDataModule(train=path, val_fraction=0.0, batch_size=7, max_length=160, packing=packing,
                             use_chat_template=rows == "prompt_response",
                             tokenizer=module.tokenizer)  # one micro-batch holds every row
        before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        one_step_trainer(1).fit(module, datamodule=data)
        steps[packing] = step_of(before, module.model), module.last_step_stats
    for n, g in steps[False][0].items():
        torch.testing.assert_close(steps[True][0][n], g, rtol=1e-3, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert steps[True][1]["tokens"] == steps[False][1]["tokens"]
    assert steps[True][1]["loss_sum"] == pytest.approx(steps[False][1]["loss_sum"], rel=1e-5)


def test_probe_takes_the_same_data_options(tmp_path, tiny_model_dir):
    """probe (and evaluate) build the fit config's SFTDataModule: packing and a mixture work there too."""
    a, b = write_rows(tmp_path / "a.jsonl", weights=True), write_rows(tmp_path / "b.jsonl", n=3)
    out = tmp_path / "probe.json"
    train = json.dumps([{"path": a, "proportion": 0.5}, {"path": b, "proportion": 0.5}])
    cli_main(["probe", "--model.model", tiny_model_dir, "--data.train", train, "--data.packing", "true",
              "--data.max_length", "160", "--data.val_fraction", "0", "--max_batches", "2", "--output", str(out),
              "--trainer.logger", "false"])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["tokens"] > 0 and report["batches"] >= 1


@pytest.mark.slow
def test_throughput_packing_quick():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a folder of scripts
    from benchmarks import _common as C
    from benchmarks import throughput

    headers, rows = C.parse_markdown_table(throughput.main(["--quick", "--packing", "--no-peer"]))
    assert headers[:2] == ["run", "real tokens/s (median)"]
    assert [r[0] for r in rows] == ["ours, data.packing: false", "ours, data.packing: true"]
    assert rows[1][4] == "0%" and float(rows[0][1]) > 0 and float(rows[1][1]) > 0  # packed: no padding
