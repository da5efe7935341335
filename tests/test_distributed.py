"""Token-exact normalisation: k accumulated micro-batches, and 2 DDP ranks, give the gradient of one big batch.

Micro-batches hold rows of different response lengths, so they carry different numbers of target
tokens: a mean of per-micro-batch means (or of per-rank means) would weight tokens unequally and
fail these comparisons. The DDP part runs 2 CPU processes (gloo) under ``torchrun``, the way a
multi-GPU job is launched, with the CLI and ``configs/ddp.yaml``, once for all its assertions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _exactness import TargetCounts, build, one_step_trainer, reference, step_of
from _torchrun import run_two_ranks
from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.objectives import AlphaFamily, ThresholdedNLL

ROWS = 12  # = accumulate x batch_size (x ranks): one optimizer step consumes every row


def all_rows_batch(data):
    data.setup()
    return data.collate(list(data.train_dataset.features))


def assert_grads_equal(step: dict, ref: dict):
    for name, g in ref.items():
        torch.testing.assert_close(step[name], g, rtol=2e-4, atol=2e-7, msg=lambda m: f"{name}: {m}")


def separating_tau(model_dir: str, data) -> float:
    """A threshold for ThresholdedNLL in the widest gap between the random model's p values near their
    median, so about half the tokens are selected and float noise cannot move a token across it."""
    module, _ = build(model_dir)
    with torch.no_grad():
        logp, mask = module.target_logprobs(all_rows_batch(data))
    p = logp[mask].exp().sort().values
    n = p.numel()
    window = range(n // 3, 2 * n // 3)
    i = max(window, key=lambda j: p[j + 1] - p[j])
    return float((p[i] + p[i + 1]) / 2)


@pytest.mark.parametrize("kind", ["alpha", "thresholded"])
def test_accumulated_micro_batches_equal_one_batch(kind, tiny_model_dir, tmp_path):
    accumulate, batch_size = 3, ROWS // 3
    if kind == "alpha":
        objective, controller = AlphaFamily(alpha=0.0), AdaptiveAlpha(initial=0.5, ema_decay=0.0, low=0.1, high=0.55, statistic="mean")
    else:
        _, probe_data = build(tiny_model_dir, num_rows=ROWS, batch_size=batch_size)
        objective, controller = ThresholdedNLL(tau=separating_tau(tiny_model_dir, probe_data)), None
    module, data = build(tiny_model_dir, objective=objective, alpha_controller=controller, num_rows=ROWS,
                         batch_size=batch_size, export_dir=str(tmp_path / "export"))
    alpha_used = objective.alpha
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    counts = TargetCounts()
    one_step_trainer(accumulate, callbacks=[counts]).fit(module, datamodule=data)

    assert len(counts.counts) == accumulate and len(set(counts.counts)) > 1, counts.counts  # uneven micro-batches
    ref_objective = AlphaFamily(alpha=alpha_used) if kind == "alpha" else ThresholdedNLL(tau=objective.tau)
    grads, loss, mean_p = reference(tiny_model_dir, ref_objective, all_rows_batch(data))
    assert_grads_equal(step_of(before, module.model), grads)
    stats = module.last_step_stats
    assert stats["loss_sum"] / stats["normalizer"] == pytest.approx(loss, rel=1e-5)
    if kind == "alpha":
        assert 0 < alpha_used  # initial=0.5 starts alpha inside (0, alpha_max]: not plain NLL
        assert controller.ema == pytest.approx(mean_p, rel=1e-5)  # decay 0: the EMA is the step's mean p
    else:
        assert 0 < stats["selected"] < stats["tokens"]  # a real selection, normalised by its own count
        assert stats["normalizer"] == stats["selected"]


@pytest.fixture(scope="module")
def ddp_results(tiny_model_dir, tmp_path_factory):
    """Both one-step fits on 2 DDP ranks (CPU, gloo), launched once with torchrun."""
    out = tmp_path_factory.mktemp("ddp")
    _, data = build(tiny_model_dir, num_rows=ROWS, batch_size=3)
    tau = separating_tau(tiny_model_dir, data)
    run_two_ranks("_ddp_worker.py", str(out), tiny_model_dir, repr(tau), timeout=180)
    names = ("alpha", "thresholded", "plateau")
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in names}, data, tau


@pytest.mark.slow
def test_ddp_plateau_alpha_decides_and_restores_the_same_on_every_rank(ddp_results):
    ranks = ddp_results[0]["plateau"]["ranks"]
    assert len(ranks) == 2
    state = ranks[0]["controller"]
    assert state["validations"] == 3 and state["rises"] == [2] and state["restored"] == [2]
    assert ranks[1]["controller"] == state  # the same synced val/nll, the same decisions
    assert ranks[1]["weights"] == ranks[0]["weights"]  # both ranks loaded the same best weights and trained on


@pytest.mark.slow  # processes of their own: in `make test`, not in the fast loop
@pytest.mark.parametrize("kind", ["alpha", "thresholded"])
def test_ddp_two_ranks_equal_one_batch(kind, ddp_results, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    results, data, tau = ddp_results
    result = results[kind]
    assert result["world_size"] == 2
    counts = [c for rank in result["counts"] for c in rank]
    assert len(counts) == 4 and len(set(counts)) > 1, result["counts"]  # 2 ranks x 2 micro-batches, uneven
    assert sum(result["counts"][0]) != sum(result["counts"][1])  # the ranks carry different token counts
    objective = AlphaFamily(alpha=result["alpha_used"]) if kind == "alpha" else ThresholdedNLL(tau=tau)
    grads, loss, mean_p = reference(tiny_model_dir, objective, all_rows_batch(data))
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    # The model rank 0 exported at the end of fit (save_pretrained): theta_1 = theta_0 - gradient.
    after = AutoModelForCausalLM.from_pretrained(Path(result["log_dir"]) / "hf_model")
    assert_grads_equal(step_of({n: p.detach() for n, p in before.items()}, after), grads)
    stats = result["stats"]
    assert stats["tokens"] == sum(counts)  # statistics are summed over both ranks
    assert stats["loss_sum"] / stats["normalizer"] == pytest.approx(loss, rel=1e-5)
    assert stats["p_sum"] / stats["tokens"] == pytest.approx(mean_p, rel=1e-5)  # token-weighted mean p
    if kind == "alpha":
        # The α controller was fed the token-weighted mean p over both ranks (decay 0: EMA = last value).
        assert result["ema"] == pytest.approx(mean_p, rel=1e-5)
    else:
        assert 0 < stats["selected"] < stats["tokens"] and stats["normalizer"] == stats["selected"]
    # ddp.yaml's periodic checkpoint holds the controller and the sampler position (rank 0's view).
    state = torch.load(Path(result["log_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2}]
    if kind == "alpha":
        assert state["bnll"]["alpha_controller"]["ema_m"] == pytest.approx(mean_p, rel=1e-5)
