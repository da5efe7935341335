"""Scaling configs and helpers: the overlays parse, FSDP's wrap policy, 8-bit AdamW on CPU.

DDP through the CLI under torchrun is in test_distributed.py.

FSDP itself needs CUDA (torch's FSDP refuses CPU devices), so only its policy resolution and
config parsing are tested here; docs/scaling.md says what was not run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from bnll_lightning.cli import load_from_config, main
from bnll_lightning.strategies import HFFSDPStrategy, decoder_layer_classes

CONFIGS = Path(__file__).parents[1] / "configs"
OVERLAYS = ["ddp.yaml", "fsdp.yaml", "fsdp2.yaml", "lora.yaml", "qlora.yaml", "adamw8bit.yaml"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_configs_layer_on_the_demo(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model: embedded" in capsys.readouterr().out  # the job config's keys survive the overlay


def test_fsdp_strategy_wraps_and_checkpoints_the_decoder_layers(tiny_model_dir, tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cli = load_from_config(["--config", str(CONFIGS / "fsdp.yaml"), "--model.model", tiny_model_dir,
                            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                            "--trainer.logger.init_args.save_dir", str(tmp_path)])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, HFFSDPStrategy) and strategy._state_dict_type == "sharded"
    assert decoder_layer_classes(cli.model) == {LlamaDecoderLayer}

    seen = {}
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: seen.update(
        wrap=self.kwargs["auto_wrap_policy"], checkpoint=self._activation_checkpointing_kwargs["auto_wrap_policy"]))
    strategy._setup_model(cli.model)  # the wrapping itself (FSDP) needs CUDA: stop before it
    assert seen["wrap"]._module_classes == {LlamaDecoderLayer}
    assert seen["checkpoint"]._module_classes == {LlamaDecoderLayer}


def test_decoder_layer_classes_needs_no_split_modules():
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


def test_adamw8bit_config_trains_on_cpu(tiny_model_dir, tmp_path):
    cli = load_from_config(["--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "nll.yaml"), "--config", str(CONFIGS / "adamw8bit.yaml"),
                            "--model.model", tiny_model_dir, "--trainer.max_steps", "2",
                            "--model.optimizer.init_args.lr", "1e-2", "--trainer.accelerator", "cpu",
                            "--data.num_train", "16", "--data.num_val", "0", "--data.batch_size", "4",
                            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                            "--model.export_dir", str(tmp_path / "export")])
    before = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer).__name__ == "AdamW8bit"
    embed = cli.model.model.get_input_embeddings().weight
    assert optimizer.state[embed]["state1"].dtype == torch.uint8  # 8-bit moments for the big tensors
    assert any(not torch.equal(before[n], p) for n, p in cli.model.model.named_parameters())


def test_fsdp_strategy_refuses_lora_before_training(tiny_model_dir):
    from bnll_lightning.lora import LoraArgs
    from bnll_lightning.module import SFTModule

    module = SFTModule(model=tiny_model_dir, lora=LoraArgs(r=2))
    with pytest.raises(ValueError, match="not supported with HFFSDPStrategy"):
        HFFSDPStrategy()._setup_model(module)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_and_validate(precision, tiny_model_dir, tmp_path):
    cli = load_from_config(["--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "nll.yaml"), "--model.model", tiny_model_dir,
                            "--trainer.precision", precision, "--trainer.accelerator", "cpu",
                            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                            "--data.num_train", "8", "--data.num_val", "4", "--data.batch_size", "4",
                            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                            "--model.export_dir", str(tmp_path / "export"), "--model.histogram_every_n_steps", "0"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/nll"])
    assert cli.model.last_step_stats["tokens"] > 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_adamw_is_clipped_on_true_gradients_under_mixed_precision(precision, tiny_model_dir, tmp_path):
    """Lightning's AMP plugin refuses to clip for an optimizer that unscales inside its step (fused
    AdamW, the module default); the module unscales and clips itself. Every step must then see the
    true (unscaled) gradients with the clipped norm. fp16 runs with a GradScaler on CPU here (the
    Trainer alone would switch CPU fp16 to bf16)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    clip = 0.01  # far below the tiny model's gradient norm: every step is clipped
    cli = load_from_config(["--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "nll.yaml"), "--model.model", tiny_model_dir,
                            "--data.num_train", "12", "--data.num_val", "0", "--data.batch_size", "4",
                            "--model.export_dir", str(tmp_path / "export"), "--model.histogram_every_n_steps", "0"])
    norms, scales = [], []

    class StepProbe(L.Callback):
        """The gradients the optimizer stepped with (still there after the step), and the scale
        GradScaler handed to the fused step (a pre-hook; under bf16 the closure runs inside step)."""

        def on_train_start(self, trainer, pl_module):
            (optimizer,) = trainer.optimizers
            assert optimizer.defaults["fused"]
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: scales.append(getattr(opt, "grad_scale", None)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "16-mixed" else None
    trainer = L.Trainer(
        accelerator="cpu", devices=1, plugins=[MixedPrecision(precision, "cpu", scaler)], gradient_clip_val=clip,
        max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StepProbe()], default_root_dir=tmp_path,
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(norms) == 3 and len(scales) == 3
    assert all(s is None for s in scales)  # unscaled before the step: the fused kernel does not divide again
    assert norms == pytest.approx([clip] * 3, rel=1e-3)


def test_weight_decay_groups_come_from_names_not_shapes(tiny_model_dir):
    """Under FSDP the optimizer sees flat 1-D shards: the groups must not depend on shapes."""
    from bnll_lightning.models import load_model
    from bnll_lightning.optim import decay_groups

    model = load_model(tiny_model_dir)
    decay, no_decay = decay_groups(model)
    by_shape = [p for p in model.parameters() if p.ndim >= 2], [p for p in model.parameters() if p.ndim < 2]
    assert [id(p) for p in decay] == [id(p) for p in by_shape[0]] and no_decay and len(no_decay) == len(by_shape[1])
    for p in model.parameters():  # what FSDP's flat parameters look like to the optimizer
        p.data = p.data.view(-1)
    assert [list(map(id, g)) for g in decay_groups(model)] == [list(map(id, decay)), list(map(id, no_decay))]


def test_warm_start_batches_refuse_a_sharded_strategy_and_give_ranks_equal_batches(tiny_model_dir):
    from types import SimpleNamespace

    import torch

    from bnll_lightning.alpha import AdaptiveAlpha
    from bnll_lightning.module import SFTModule
    from bnll_lightning.objectives import AlphaFamily
    from bnll_lightning.probe import sample_batches
    from bnll_lightning.strategies import HFFSDPStrategy

    loader = torch.utils.data.DataLoader(list(range(11)), batch_size=2)
    counts = [len(list(sample_batches(loader, None, rank=r, world_size=2))) for r in (0, 1)]
    rows = [sum(len(b) for b in sample_batches(loader, None, rank=r, world_size=2)) for r in (0, 1)]
    assert counts[0] == counts[1] and rows == [5, 5]
    module = SFTModule(model=tiny_model_dir, objective=AlphaFamily(0.0), alpha_controller=AdaptiveAlpha(), warm_start_batches=2)
    module.trainer = SimpleNamespace(strategy=HFFSDPStrategy(), world_size=2, global_rank=0)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="FSDP cannot do: set model.warm_start_batches: 0"):
        module._warm_start_controller()
