"""FSDP2 for real: 2 CPU ranks (gloo) shard a tiny model with ``FSDP2Strategy``, train it as DDP does,
write a sharded checkpoint, resume from it, and export a consolidated ``save_pretrained`` directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _torchrun import run_two_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_two_ranks("_fsdp2_worker.py", str(out), tiny_model_dir, timeout=300)
    return torch.load(out / "results.pt", weights_only=False)


def test_sharded_training_follows_the_unsharded_run(runs):
    ddp, fsdp2 = runs["ddp"], runs["fsdp2"]
    assert (ddp["strategy"], fsdp2["strategy"]) == ("DDPStrategy", "FSDP2Strategy")
    assert fsdp2["global_step"] == ddp["global_step"] == 4
    assert fsdp2["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    assert ddp["losses"][-1] < ddp["losses"][0]  # it trained (lr 1e-2 on a random model)
    # Weight decay groups are decided by name: the same tensors (whole shapes) with and without sharding.
    assert fsdp2["groups"] == ddp["groups"] and fsdp2["group_numel"] == ddp["group_numel"]


def test_sharded_checkpoint_resumes_the_same_trajectory(runs):
    step2 = Path(runs["fsdp2"]["checkpoints"]) / "step=2.ckpt"
    assert step2.is_dir() and len(list(step2.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = runs["resumed"]
    assert resumed["global_step"] == 4
    assert resumed["losses"] == pytest.approx(runs["fsdp2"]["losses"][2:], rel=1e-5)


@pytest.mark.parametrize("name", ["fsdp2", "resumed"])
def test_consolidated_export_loads_and_matches_ddp(runs, name, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(runs["ddp"]["export"]).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(runs[name]["export"]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert exported.keys() == reference.keys()
    for key, weight in reference.items():
        torch.testing.assert_close(exported[key], weight, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert any(not torch.equal(base[k], w) for k, w in exported.items())  # the trained weights, not the base
