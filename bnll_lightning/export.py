"""The end of fit: a ``save_pretrained`` directory (model and tokenizer) with a model card."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bnll_lightning.lora import export_lora, is_peft_model
from bnll_lightning.strategies import is_sharded

__all__ = ["HFExport", "gathered_state_dict", "model_card", "save_pretrained"]


class HFExport(L.Callback):
    """Writes the fine-tuned model where ``model.export_dir`` says (default ``<log dir>/hf_model``).

    ``save_pretrained`` of model and tokenizer: under FSDP/FSDP2 every rank joins in gathering the
    full weights and rank 0 writes them; a LoRA model is written merged or as an adapter
    (``model.lora_export``). Beside them: ``README.md``, a model card (base model, objective, α's
    trajectory, data, steps, final validation metrics, how to reproduce), and ``training_config.yaml``,
    the run's resolved config. ``SFTModule`` adds this callback to every fit unless one is configured.
    """

    def __init__(self, model_card: bool = True) -> None:
        """
        Args:
            model_card: Also write ``README.md`` and ``training_config.yaml`` next to the weights.
        """
        self.model_card = model_card
        self.alphas: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Before the module's own hook, which moves α: this is the α the step trained with.
        alpha = getattr(pl_module.objective, "alpha", None)
        if alpha is not None:
            self.alphas.append(float(alpha))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank runs this: log_dir broadcasts from rank 0 and the sharded gather is a collective.
        log_dir = trainer.log_dir
        directory = pl_module.export_dir or os.path.join(log_dir or ".", "hf_model")
        state_dict = gathered_state_dict(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        save_pretrained(pl_module, directory, state_dict)
        if self.model_card:
            config = os.path.join(log_dir or "", "config.yaml")  # LightningCLI's SaveConfigCallback
            has_config = bool(log_dir) and os.path.isfile(config)
            if has_config:
                shutil.copyfile(config, os.path.join(directory, "training_config.yaml"))
            with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(trainer, pl_module, self.alphas, has_config))
        root = getattr(pl_module.logger, "save_dir", None) or os.path.dirname(log_dir or ".")
        rank_zero_info(f"[bnll] TensorBoard logs: {log_dir}  (tensorboard --logdir {root})")
        rank_zero_info(f"[bnll] exported model: {directory}")

    def state_dict(self) -> dict[str, Any]:
        return {"alphas": self.alphas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alphas = list(state_dict.get("alphas", []))


def gathered_state_dict(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Tensor] | None:
    """Under FSDP or FSDP2: the full weights of ``module.model`` gathered on rank 0 (CPU; empty on the
    other ranks). Every rank must call it. None when the model is not sharded."""
    if not is_sharded(trainer.strategy):
        return None
    # FSDP: the wrapped LightningModule; FSDP2: the module itself. Keys "model.<transformers key>".
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(trainer.strategy.model, options=options)
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def save_pretrained(module: L.LightningModule, directory: str, state_dict: dict[str, Tensor] | None = None) -> str:
    """Write ``module.model`` and its tokenizer with ``save_pretrained`` (loadable by ``from_pretrained``);
    ``state_dict``: the gathered full weights of a sharded model. LoRA: as ``module.lora_export`` says."""
    os.makedirs(directory, exist_ok=True)
    if is_peft_model(module.model):
        export_lora(module.model, directory, module.lora_export)
    else:
        module.model.save_pretrained(directory, state_dict=state_dict)
    module.tokenizer.save_pretrained(directory)
    return directory


def _number(value: Any) -> str:
    value = float(value)
    return f"{value:.4g}"


def model_card(trainer: L.Trainer, module: Any, alphas: list[float], has_config: bool) -> str:
    """The export's ``README.md``: what was trained from what, on what, how, and how well."""
    data = trainer.datamodule
    controller = getattr(module, "alpha_controller", None)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [bnll_lightning, sft]",
        "---",
        "",
        "# Fine-tuned with bnll_lightning",
        "",
        f"- **Base model:** `{module.hparams.get('model', '?')}`",
        f"- **Objective:** `{module.objective!r}`" + (f", α controller `{controller!r}`" if controller else ""),
    ]
    if alphas:
        lines.append(f"- **α over {len(alphas)} optimizer steps:** start {_number(alphas[0])}, end {_number(alphas[-1])},"
                     f" mean {_number(sum(alphas) / len(alphas))}")
    if data is not None:
        source_rows = getattr(data, "source_rows", None) or {}
        rows = "; ".join(f"`{k}` {v} rows" for k, v in source_rows.items())
        val = getattr(data, "val", None)
        lines.append(f"- **Data:** train `{getattr(data, 'train', None)}`" + (f" ({rows})" if rows else "")
                     + (f", validation `{val}`" if val else ""))
    lines.append(f"- **Training:** {trainer.global_step} optimizer steps, precision `{trainer.precision}`,"
                 f" {trainer.world_size} process(es)")
    val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if val:
        lines += ["", "## Final validation metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_number(v)} |" for k, v in sorted(val.items())]
    lines += ["", "## Reproduce", "", "```bash"]
    if has_config:
        lines.append("python -m bnll_lightning fit --config training_config.yaml   # the run's resolved config")
    lines += [f"# as launched: python -m bnll_lightning {shlex.join(sys.argv[1:])}", "```", ""]
    return "\n".join(lines)
