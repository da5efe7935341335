"""Objectives beyond log p inside SFTModule: the frozen reference of ASFT (not trained, not in the
optimizer, checkpoints or export), streamed == full logits at the module level, and which
objectives an alpha controller may drive."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.data import SFTDataModule
from bnll_lightning.logp_head import StreamingArgs
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import ASFT, EAFT, NLL, NegProb, TokenAlpha
from bnll_lightning.reference import FrozenReference


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def module_for(model_dir, objective, **kwargs):
    return SFTModule(model=model_dir, objective=objective, optimizer=adamw, warmup=0, histogram_every_n_steps=0,
                     streaming=StreamingArgs(chunk_size=16), **kwargs)


def a_batch(module, n=4):
    data = SFTDataModule(train="builtin:add", num_train=n, num_val=0, batch_size=n, tokenizer=module.tokenizer)
    return data, data.collate(data.train_dataset.features[:n])


@pytest.fixture(scope="module")
def asft_run(tiny_model_dir, tmp_path_factory):
    """Two optimizer steps of ASFT through Lightning, with a checkpoint and the export."""
    root = tmp_path_factory.mktemp("asft")
    module = module_for(tiny_model_dir, ASFT(kl_weight=1.0), export_dir=str(root / "export"))
    data, _ = a_batch(module, 8)
    data.batch_size = 4
    reference_before = {n: p.detach().clone() for n, p in module.objective.reference.model.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
                        callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)])
    trainer.fit(module, datamodule=data)
    return module, trainer, root, reference_before, policy_before


def test_asft_reference_is_frozen_and_outside_the_trained_module(asft_run, tiny_model_dir):
    module, trainer, root, reference_before, policy_before = asft_run
    reference = module.objective.reference
    assert isinstance(reference, FrozenReference) and reference.name == tiny_model_dir  # default: the base model
    ref_params = list(reference.parameters())
    assert all(not p.requires_grad and p.grad is None for p in ref_params)
    assert not reference.model.training  # eval mode: no dropout in the anchor
    ids = {id(p) for p in ref_params}
    assert not ids & {id(p) for p in module.parameters()}
    optimizer = trainer.optimizers[0]
    assert not ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    plain = module_for(tiny_model_dir, NLL())
    assert module.state_dict().keys() == plain.state_dict().keys()  # checkpoints carry no reference
    checkpoint = torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"].keys() == plain.state_dict().keys()
    for name, p in reference.model.named_parameters():
        assert torch.equal(p, reference_before[name]), name  # the anchor never moved
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, policy_before[n])]
    assert moved  # the policy trained
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(root / "export")
    n_policy = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for p in exported.parameters()) == n_policy  # the export is the policy alone
    assert module.last_step_stats["loss_sum"] > 0


@pytest.mark.parametrize(
    "objective", [ASFT(0.5), ASFT(0.5, direction="reverse"), EAFT(1.0, k=8), TokenAlpha(1.0, signal="entropy")],
    ids=lambda o: o.tag + getattr(o, "direction", ""),
)
def test_module_streamed_equals_full_logits(objective, tiny_model_dir, tmp_path):
    """training_step's loss and gradients: streamed vs full logits, with a reference that differs
    from the policy (another random model of the same vocabulary)."""
    from benchmarks._common import make_tiny_model

    if isinstance(objective, ASFT):
        objective.reference_name = make_tiny_model(str(tmp_path / "ref"), hidden_size=16, num_layers=1, num_heads=2,
                                                   intermediate_size=32, seed=3)
    module = module_for(tiny_model_dir, objective)
    _, batch = a_batch(module)
    results = []
    for streamed in (True, False):
        module.head.streamed = streamed
        module.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()}))
    (ls, gs), (ln, gn) = results
    torch.testing.assert_close(ls, ln, rtol=1e-5, atol=1e-5)
    for name in gn:
        scale = gn[name].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(gs[name] / scale, gn[name] / scale, rtol=1e-4, atol=1e-5)
    if isinstance(objective, ASFT):
        stats = module.target_stats(batch)
        assert stats.kl[stats.mask].min() > 0  # the anchor is a different model: the KL term is live


def test_reference_dtype_and_name(tiny_model_dir, tmp_path):
    module = module_for(tiny_model_dir, ASFT(reference_dtype="bfloat16"))
    assert module.objective.reference.dtype == torch.bfloat16
    assert next(module.model.parameters()).dtype == torch.float32
    _, batch = a_batch(module)
    stats = module.target_stats(batch)  # a bf16 reference streams into float32 statistics
    assert stats.kl.dtype == torch.float32 and torch.isfinite(stats.kl).all()
    assert stats.kl[stats.mask].abs().max() < 1e-2  # bf16 copy of the same weights: nearly no divergence
    policy_bytes = sum(p.numel() * 4 for p in module.model.parameters())
    assert module.objective.reference.num_bytes() == pytest.approx(policy_bytes / 2, rel=1e-3)  # half the memory


@pytest.mark.parametrize("objective, reason", [(EAFT(), "entropy"), (ASFT(), "KL anchor"),
                                                (NegProb(), "fixes alpha"), (NLL(), "not a member")])
def test_alpha_controller_refuses_objectives_it_cannot_drive(objective, reason, tiny_model_dir):
    with pytest.raises(ValueError, match=f"alpha_controller.*{reason}"):
        module_for(tiny_model_dir, objective, alpha_controller=AdaptiveAlpha())


def test_token_alpha_is_driven_by_adaptive_alpha(tiny_model_dir, tmp_path):
    module = module_for(tiny_model_dir, TokenAlpha(0.0), alpha_controller=AdaptiveAlpha(initial=0.995, max_delta=1.0),
                        export_dir=str(tmp_path / "export"))
    assert module.objective.alpha == AdaptiveAlpha(initial=0.995).target(0.995) == 1.0  # the ceiling, set by the controller
    data, _ = a_batch(module, 8)
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=data)
    assert module.alpha_controller.step == 2 and module.objective.alpha == module.alpha_controller.alpha
