"""Per-row weights: reading and checking them, the weighted loss of every objective, exactness over a step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _exactness import one_step_trainer, sgd_lr1, step_of
from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.cli import main as cli_main
from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import (
    ASFT, DFT, EAFT, NLL, AlphaFamily, Focal, NegProb, ThresholdedNLL, TokenAlpha, TopFraction,
)
from bnll_lightning.reference import load_reference
from bnll_lightning.sources import DataError

# Objectives whose loss is elementwise in the tokens (TopFraction's selection depends on the batch's count).
ELEMENTWISE = {
    "NLL": NLL, "AlphaFamily": lambda: AlphaFamily(0.5), "NegProb": NegProb, "DFT": DFT, "Focal": Focal,
    "ThresholdedNLL": lambda: ThresholdedNLL(tau=0.0), "EAFT": EAFT, "ASFT": ASFT,
    "TokenAlpha": lambda: TokenAlpha(1.0, low=1e-6, high=1e-4),
    "TokenAlpha-entropy": lambda: TokenAlpha(signal="entropy"),
}  # fmt: skip
EVERY = {**ELEMENTWISE, "TopFraction": lambda: TopFraction(0.5)}


def rows(n: int = 6) -> list[dict]:
    """Rows with responses of different lengths, so rows carry different numbers of target tokens."""
    return [{"prompt": f"Repeat {i}.", "response": " ".join(["word"] * (1 + 3 * i))} for i in range(n)]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def batch_of(tokenizer, path: str, **kwargs) -> dict[str, torch.Tensor]:
    """Every training row of ``path``, in file order, in one batch."""
    dm = SFTDataModule(train=path, val_fraction=0.0, tokenizer=tokenizer, **kwargs)
    dm.setup()
    return dm.collate(list(dm.train_dataset.features))


def step_gradient(module: SFTModule, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradient of the module's summed loss for one micro-batch (what training_step returns), its sums."""
    module.zero_grad(set_to_none=True)
    module._acc = None
    loss_sum = module.training_step(batch, 0)
    loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return grads, loss_sum.detach(), module._acc


# --------------------------------------------------------------------------- reading


def test_weights_are_read_with_their_column_and_zero_weight_rows_train_nothing(tmp_path, tokenizer):
    items = rows(4)
    items[0]["w"], items[1]["w"], items[2]["w"] = 2, 0.5, 0
    dm = SFTDataModule(train=write_jsonl(tmp_path / "a.jsonl", items), val_fraction=0.0, weight_column="w",
                       tokenizer=tokenizer)
    dm.setup()
    assert [f["weight"] for f in dm.train_dataset.features] == [2.0, 0.5, 1.0]  # missing: 1
    assert dm.stats["train"]["skipped_zero_weight"] == 1 and dm.stats["train"]["rows"] == 3
    batch = dm.collate(dm.train_dataset.features[:2])
    lengths = batch["attention_mask"].sum(1)
    assert batch["weights"].dtype == torch.float32
    assert batch["weights"][0, : lengths[0]].eq(2.0).all() and batch["weights"][0, lengths[0]:].eq(0).all()
    assert batch["weights"][1, : lengths[1]].eq(0.5).all()
    # Without a weight anywhere there is no weight tensor at all: the unweighted path, unchanged.
    plain = batch_of(tokenizer, write_jsonl(tmp_path / "b.jsonl", rows(2)))
    assert set(plain) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize("value, says", [
    (-1, "a finite number >= 0, got -1"), (float("nan"), "a finite number >= 0, got nan"),
    (True, "a finite number >= 0, got True"), ([1], r"a finite number >= 0, got \[1\]"),
    # A quoted number in JSON is not taken as one (CSV cells are all text: there it is)
    ("2", r"a number, got the string '2' \(write it unquoted\)"), ("heavy", "a number, got the string 'heavy'"),
])  # fmt: skip
def test_bad_weights_are_data_errors_naming_file_line_and_value(value, says, tmp_path, tokenizer):
    items = rows(3)
    items[1]["weight"] = value
    path = write_jsonl(tmp_path / "bad.jsonl", items)
    match = rf"bad\.jsonl: row 1 \(line 2\): field 'weight' must be {says}"
    with pytest.raises(DataError, match=match):
        SFTDataModule(train=path, tokenizer=tokenizer).setup()


def test_csv_weights_and_the_cli_exits_2_with_one_line(tmp_path, tokenizer, tiny_model_dir, capsys):
    good = tmp_path / "good.csv"
    good.write_text("prompt,response,weight\nhi,there,2\nyo,you,\n")  # an empty cell is a missing weight: 1
    dm = SFTDataModule(train=str(good), val_fraction=0.0, tokenizer=tokenizer)
    dm.setup()
    assert [f["weight"] for f in dm.train_dataset.features] == [2.0, 1.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,response,weight\nhi,there,1\nyo,you,-3\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.model", tiny_model_dir, "--data.train", str(bad), "--trainer.logger", "false",
                  "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars: one line
    assert err.startswith("bnll_lightning: data error:")
    assert "bad.csv: row 1 (line 3): field 'weight' must be a finite number >= 0, got '-3'" in err


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", sorted(EVERY))
def test_weights_one_are_bit_identical_and_weights_zero_give_zero(name, tiny_model_dir):
    objective = EVERY[name]()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :2] = labels[1, 5:] = -100
    ref_logits = torch.randn(2, 7, 50, generator=g) if objective.requires.reference else None

    def run(weights):
        logits.grad = None
        out = objective(logits, labels, ref_logits=ref_logits, weights=weights)
        out.loss_sum.backward()
        return out, logits.grad.clone()

    plain, grad = run(None)
    ones, grad_ones = run(torch.ones(2, 7))
    assert torch.equal(ones.loss_sum, plain.loss_sum) and torch.equal(ones.normalizer, plain.normalizer)
    assert torch.equal(grad_ones, grad)  # bit for bit
    zero, grad_zero = run(torch.zeros(2, 7))
    assert zero.loss.item() == 0.0 and zero.normalizer.item() == 0.0 and torch.isfinite(zero.loss)
    assert torch.equal(grad_zero, torch.zeros_like(grad_zero))


@pytest.fixture(scope="module")
def shared_module(tiny_model_dir):
    """One module for the per-objective tests; each sets its objective (ASFT binds its reference)."""
    return SFTModule(model=tiny_model_dir)


def with_objective(module: SFTModule, objective, model_dir: str) -> SFTModule:
    if objective.requires.reference:
        objective.bind_reference(load_reference(objective, model_dir))
    module.objective = objective
    return module


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_a_row_of_weight_2_is_that_row_twice(name, tmp_path, tokenizer, tiny_model_dir, shared_module):
    items = rows(3)
    weighted = write_jsonl(tmp_path / "w.jsonl", [{**items[0], "weight": 2}, items[1], items[2]])
    twice = write_jsonl(tmp_path / "t.jsonl", [items[0], items[0], items[1], items[2]])
    module = with_objective(shared_module, ELEMENTWISE[name](), tiny_model_dir)
    g_w, loss_w, acc_w = step_gradient(module, batch_of(tokenizer, weighted))
    g_t, loss_t, acc_t = step_gradient(module, batch_of(tokenizer, twice))
    torch.testing.assert_close(loss_w, loss_t, rtol=1e-5, atol=0)
    torch.testing.assert_close(acc_w[1], acc_t[1])  # normaliser: summed weight = count of the copies
    torch.testing.assert_close(acc_w[2:4], acc_t[2:4], rtol=1e-5, atol=0)  # nll and p sums, weighted
    for n, g in g_t.items():
        torch.testing.assert_close(g_w[n], g, rtol=1e-4, atol=1e-8, msg=lambda m: f"{n}: {m}")


def test_data_of_weight_1_trains_bit_for_bit_like_data_without_weights(tmp_path, tokenizer, tiny_model_dir,
                                                                       shared_module):
    items = rows(4)
    ones = batch_of(tokenizer, write_jsonl(tmp_path / "ones.jsonl", [{**r, "weight": 1} for r in items]))
    plain = batch_of(tokenizer, write_jsonl(tmp_path / "plain.jsonl", items))
    assert "weights" in ones and "weights" not in plain
    for objective in (NLL(), AlphaFamily(1.0), ThresholdedNLL(0.0), TopFraction(0.5), EAFT()):
        module = with_objective(shared_module, objective, tiny_model_dir)
        g_ones, loss_ones, acc_ones = step_gradient(module, ones)
        g_plain, loss_plain, acc_plain = step_gradient(module, plain)
        assert torch.equal(loss_ones, loss_plain) and torch.equal(acc_ones, acc_plain)
        assert all(torch.equal(g_ones[n], g) for n, g in g_plain.items())


def test_an_all_zero_weight_batch_gives_loss_0_and_no_nan(tmp_path, tokenizer, tiny_model_dir, shared_module):
    batch = batch_of(tokenizer, write_jsonl(tmp_path / "a.jsonl", [{**r, "weight": 1} for r in rows(2)]))
    batch["weights"].zero_()
    module = with_objective(shared_module, AlphaFamily(1.0), tiny_model_dir)
    grads, loss_sum, acc = step_gradient(module, batch)
    assert loss_sum.item() == 0.0 and torch.isfinite(acc).all() and acc[1].item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


# --------------------------------------------------------------------------- over a whole optimizer step


def test_weighted_step_over_accumulated_micro_batches_equals_one_batch(tmp_path, tokenizer, tiny_model_dir):
    """3 micro-batches of uneven tokens and weights: the step's gradient, loss and the alpha controller's
    mean p are those of one batch holding every row, weighted."""
    items = [{**r, "weight": [0.5, 1, 2, 3][i % 4]} for i, r in enumerate(rows(12))]
    path = write_jsonl(tmp_path / "w.jsonl", items)
    controller = AdaptiveAlpha(initial=0.5, ema_decay=0.0, low=0.1, high=0.9, statistic="mean")  # starts inside (0, 1)
    module = SFTModule(model=tiny_model_dir, objective=AlphaFamily(0.0), alpha_controller=controller,
                       optimizer=sgd_lr1, warmup=0, export_dir=str(tmp_path / "export"))
    data = SFTDataModule(train=path, val_fraction=0.0, batch_size=4, tokenizer=module.tokenizer)
    alpha_used = module.objective.alpha
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    one_step_trainer(3).fit(module, datamodule=data)

    reference = SFTModule(model=tiny_model_dir)
    batch = batch_of(tokenizer, path)
    logp, mask = reference.target_logprobs(batch)
    weights = torch.nn.functional.pad(batch["weights"][:, 1:], (0, 1))
    out = AlphaFamily(alpha_used).from_logprobs(logp, mask, weights)
    out.loss.backward()
    step = step_of(before, module.model)
    for n, p in reference.model.named_parameters():
        torch.testing.assert_close(step[n], p.grad, rtol=2e-4, atol=2e-7, msg=lambda m: f"{n}: {m}")
    s = module.last_step_stats
    assert s["loss_sum"] / s["normalizer"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert s["normalizer"] == pytest.approx(weights[mask].sum().item()) != s["tokens"]
    mean_p = ((logp.exp() * weights)[mask].sum() / weights[mask].sum()).item()
    assert controller.ema == pytest.approx(mean_p, rel=1e-5)  # decay 0: the EMA is the step's weighted mean p
    assert math.isclose(s["p_sum"] / s["weight"], mean_p, rel_tol=1e-5)
