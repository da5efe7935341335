"""LoRA via peft: only adapters train, objectives/controller/streamed log p work unchanged, export merged or adapter."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.data import SFTDataModule
from bnll_lightning.lora import LoraArgs
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import AlphaFamily


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def lora_fit(model_dir, export_dir, lora_export):
    module = SFTModule(model=model_dir, objective=AlphaFamily(0.0), alpha_controller=AdaptiveAlpha(initial=0.5),
                       optimizer=adamw, warmup=0, lora=LoraArgs(r=4, alpha=8, export=lora_export),
                       export_dir=str(export_dir), histogram_every_n_steps=0)
    data = SFTDataModule(train="builtin:sort", num_train=8, num_val=0, batch_size=4, tokenizer=module.tokenizer)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" not in n}
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=data)
    return module, data, base


@pytest.fixture(scope="module")
def merged_run(tiny_model_dir, tmp_path_factory):
    return lora_fit(tiny_model_dir, tmp_path_factory.mktemp("lora") / "merged", "merged")


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_trains_only_the_adapters_with_the_streamed_path(merged_run):
    module, data, base = merged_run
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert module.head.streamed  # peft keeps a plain output head: log p is still streamed
    for name, p in module.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name  # the base stays frozen
    assert module.objective.alpha == module.alpha_controller.alpha and module.alpha_controller.step == 2
    # Streamed log p of the adapted model = log softmax of its own logits.
    batch = data.collate(data.train_dataset.features[:4])
    with torch.no_grad():
        logp, mask = module.target_logprobs(batch)
    full = torch.log_softmax(logits(module.model, batch).float(), -1)[:, :-1]
    ref = full.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    torch.testing.assert_close(logp[:, :-1][mask[:, :-1]], ref[mask[:, :-1]], rtol=1e-5, atol=1e-5)


def test_merged_export_is_a_plain_model_that_differs_from_the_base(merged_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    module, data, _ = merged_run
    exported = AutoModelForCausalLM.from_pretrained(module.export_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in k for k in exported.state_dict())
    batch = data.collate(data.train_dataset.features[:4])
    assert not torch.allclose(logits(exported, batch), logits(base, batch))
    torch.testing.assert_close(logits(exported, batch), logits(module.model, batch), rtol=1e-4, atol=1e-4)
    assert any(p.requires_grad for p in module.model.parameters())  # merging left the training model intact


def test_adapter_export_loads_with_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, data, _ = lora_fit(tiny_model_dir, tmp_path / "adapter", "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    batch = data.collate(data.train_dataset.features[:4])
    torch.testing.assert_close(logits(loaded, batch), logits(module.model, batch), rtol=1e-5, atol=1e-5)


def test_qlora_needs_adapters_and_a_gpu(tiny_model_dir):
    with pytest.raises(ValueError, match="lora.r"):
        LoraArgs(load_in_4bit=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            SFTModule(model=tiny_model_dir, lora=LoraArgs(r=4, load_in_4bit=True))
