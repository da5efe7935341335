"""The end of fit: a ``save_pretrained`` directory (model, tokenizer, model card), written whole or not at all."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bnll_lightning import disk
from bnll_lightning.constraints import ConfigError
from bnll_lightning.lora import export_lora, is_peft_model
from bnll_lightning.models import EMBEDDED_SOURCE, describe_model, is_embedded
from bnll_lightning.signals import checkpoint_path, remove_stopgap
from bnll_lightning.strategies import is_sharded

__all__ = ["ExportFailed", "HFExport", "gathered_state_dict", "model_card", "replace_directory", "run_places",
           "save_pretrained", "unwritable_reason"]

#: The checkpoint a failed export leaves (the name starts with "last": ``--ckpt_path last`` finds it).
FAILED_EXPORT_CHECKPOINT = "last-export-failed.ckpt"


class ExportFailed(RuntimeError):
    """The end-of-fit export could not be written. Nothing that looks like a model is left at ``directory``;
    the trained weights are in the resumable ``checkpoint`` (None: no checkpoint could be written either)."""

    def __init__(self, directory: str, error: str, checkpoint: str | None, found_by_last: bool = False) -> None:
        where = (f"the trained weights are in the checkpoint {checkpoint}" if checkpoint else
                 "no checkpoint of the trained weights could be written either")
        super().__init__(f"export to {directory} failed ({error}); {where}")
        self.directory, self.error, self.checkpoint, self.found_by_last = directory, error, checkpoint, found_by_last


def unwritable_reason(directory: str) -> str | None:
    """None if ``directory`` can be created and written (a file is made and removed in it, or in the
    nearest folder above it that exists); else why not, as the system says it."""
    path = os.path.abspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    return None


def replace_directory(directory: str, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a new folder beside ``directory``, then rename it to ``directory`` (replacing
    what was there only once the new one is complete). If ``write`` fails the folder is removed: nothing
    half-written ever sits at ``directory``."""
    path = os.path.abspath(directory)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export gets the usual permissions
        write(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(path, old)  # a directory (unwritable_reason refuses a file) onto the empty one
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class HFExport(L.Callback):
    """Writes the fine-tuned model where ``model.export_dir`` says (default ``<log dir>/hf_model``).

    ``save_pretrained`` of model and tokenizer: under FSDP/FSDP2 every rank joins in gathering the
    full weights and rank 0 writes them; a LoRA model is written merged or as an adapter
    (``model.lora.export``). Beside them: ``README.md``, a model card (base model, objective, α's
    trajectory, data, steps, final validation metrics, how to reproduce), and ``training_config.yaml``,
    the run's resolved config. ``SFTModule`` adds this callback to every fit unless one is configured.

    The directory is checked writable when fit starts, written in a folder beside it and renamed into
    place when complete. If writing fails anyway (a full disk), the partial folder is removed, the
    trained weights go to a checkpoint (``last-export-failed.ckpt`` beside the periodic ones, else in
    the system's temporary folder) that ``fit --ckpt_path`` exports from, and :class:`ExportFailed` says where.

    At the end of fit rank zero prints what the run holds on disk, per place: its checkpoint folders, the export
    and the rest of its log directory (:mod:`bnll_lightning.disk`).
    """

    def __init__(self, model_card: bool = True) -> None:
        """
        Args:
            model_card: Also write ``README.md`` and ``training_config.yaml`` next to the weights.
        """
        self.model_card = model_card
        self.alphas: list[float] = []
        self.exported: str | None = None  # the directory, once written
        self._step_at_batch_start = 0  # a batch that ends at another step ended an optimizer step

    @staticmethod
    def directory(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """Where the export goes: ``model.export_dir``, else ``<log dir>/hf_model``."""
        return getattr(pl_module, "export_dir", None) or os.path.join(trainer.log_dir or ".", "hf_model")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.exported = None
        if stage != "fit":  # checked before the first step, not found after the last
            return
        directory = self.directory(trainer, pl_module)  # every rank: trainer.log_dir is a broadcast
        reason = unwritable_reason(directory) if trainer.is_global_zero else None
        reason = trainer.strategy.broadcast(reason, src=0)  # every rank stops together
        if reason:
            raise ConfigError(f"model.export_dir: {directory} cannot be written ({reason})")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        # After the step, the α it trained with as the module published it: no reliance on hook order.
        if trainer.global_step != self._step_at_batch_start and "alpha" in pl_module.last_step_stats:
            self.alphas.append(pl_module.last_step_stats["alpha"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint of its last step (a failed export's) trains nothing, and
        # Lightning then skips on_train_end: export here.
        if self.exported is None:
            self._export(trainer, pl_module)
        # After every on_train_end: ModelCheckpoint writes save_last's last.ckpt there.
        places = run_places(trainer, self.exported)
        if trainer.is_global_zero:
            disk.print_report(places)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank runs this: log_dir broadcasts from rank 0 and the sharded gather is a collective.
        log_dir = trainer.log_dir
        directory = self.directory(trainer, pl_module)
        state_dict = gathered_state_dict(trainer, pl_module)
        error = None
        if trainer.is_global_zero:
            try:
                replace_directory(directory, lambda tmp: self._write(tmp, trainer, pl_module, state_dict, log_dir))
            except Exception as err:  # whatever broke (safetensors has its own error for a full disk): keep the weights
                error = f"{type(err).__name__}: {err}"
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise self._save_weights(trainer, directory, error)
        self.exported = directory
        remove_stopgap(trainer, FAILED_EXPORT_CHECKPOINT)  # exported now: the weights are safe
        root = getattr(pl_module.logger, "save_dir", None) or os.path.dirname(log_dir or ".")
        rank_zero_info(f"[bnll] TensorBoard logs: {log_dir}  (tensorboard --logdir {root})")
        rank_zero_info(f"[bnll] exported model: {directory}")

    def _write(self, directory: str, trainer: L.Trainer, pl_module: L.LightningModule,
               state_dict: dict[str, Tensor] | None, log_dir: str | None) -> None:  # fmt: skip
        save_pretrained(pl_module, directory, state_dict)
        if self.model_card:
            config = os.path.join(log_dir or "", "config.yaml")  # LightningCLI's SaveConfigCallback
            has_config = bool(log_dir) and os.path.isfile(config)
            if has_config:
                shutil.copyfile(config, os.path.join(directory, "training_config.yaml"))
            with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(trainer, pl_module, self.alphas, config if has_config else None))

    def _save_weights(self, trainer: L.Trainer, directory: str, error: str) -> ExportFailed:
        """The export failed: write a checkpoint of the trained weights where one fits, and say where."""
        path, found_by_last = checkpoint_path(trainer, FAILED_EXPORT_CHECKPOINT)
        fallback = os.path.join(tempfile.gettempdir(), f"bnll-{os.getpid()}-{FAILED_EXPORT_CHECKPOINT}")
        for where, by_last in ((path, found_by_last), (fallback, False)):
            try:
                trainer.save_checkpoint(where)
                return ExportFailed(directory, error, where, by_last)
            except OSError:
                if trainer.world_size > 1:
                    trainer.strategy.barrier("bnll.export_checkpoint")  # the ranks that wrote nothing wait in one
                if trainer.is_global_zero and os.path.exists(where):
                    os.remove(where)  # a partial checkpoint would not load
        return ExportFailed(directory, error, None)

    def state_dict(self) -> dict[str, Any]:
        return {"alphas": self.alphas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alphas = list(state_dict.get("alphas", []))


def run_places(trainer: L.Trainer, export: str | None) -> dict[str, str | None]:
    """Where a fit wrote: its checkpoint folders, ``export`` and its log directory (a TensorBoard or CSV logger's
    own version folder; another logger's folder may hold other runs). Every rank must call it (``log_dir``)."""
    loggers = trainer.loggers
    log_dir = trainer.log_dir if loggers else None  # a broadcast
    if loggers and not isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        log_dir = None
    places: dict[str, str | None] = {}
    # One place per folder: checkpoint callbacks often share one (a periodic one and a best-keeper).
    folders = dict.fromkeys(getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks)
    for k, folder in enumerate(folders):
        places["checkpoints" if k == 0 else f"checkpoints {k + 1}"] = folder
    return {**places, "export": export, "logs": log_dir}


def gathered_state_dict(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Tensor] | None:
    """Under FSDP or FSDP2: the full weights of ``module.model`` gathered on rank 0 (CPU; empty on the
    other ranks). Every rank must call it. None when the model is not sharded."""
    if not is_sharded(trainer.strategy):
        return None
    # FSDP: the wrapped LightningModule; FSDP2: the module itself. Keys "model.<transformers key>".
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(trainer.strategy.model, options=options)
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def tie_gathered(model: Any, state_dict: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``state_dict`` with each tied weight (``lm_head.weight`` of a model that ties its embeddings) the very
    tensor of its source, so that ``save_pretrained`` stores it once, as it does for the live model's shared
    parameters. A gathered (sharded) state dict holds a separate copy per key, which transformers, matching
    tied weights by storage, would write twice (the embedded model: 113 MB more)."""
    if not state_dict:
        return state_dict
    tied = {target: source for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if target in state_dict and source in state_dict}  # fmt: skip
    return {**state_dict, **{target: state_dict[source] for target, source in tied.items()}} if tied else state_dict


def save_pretrained(module: L.LightningModule, directory: str, state_dict: dict[str, Tensor] | None = None) -> str:
    """Write ``module.model`` and its tokenizer with ``save_pretrained`` (loadable by ``from_pretrained``);
    ``state_dict``: the gathered full weights of a sharded model. LoRA: as ``module.lora_export`` says."""
    os.makedirs(directory, exist_ok=True)
    if is_peft_model(module.model):
        export_lora(module.model, directory, module.lora_export)
    else:
        module.model.save_pretrained(directory, state_dict=tie_gathered(module.model, state_dict))
    module.tokenizer.save_pretrained(directory)
    return directory


def _number(value: Any) -> str:
    value = float(value)
    return f"{value:.4g}"


def _as_configured(spec: Any) -> str | None:
    """A config's ``class_path``/``init_args`` entry as a call, e.g. ``AlphaFamily(alpha=0.0)``."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        return None
    args = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items())
    return f"{str(spec['class_path']).rsplit('.', 1)[-1]}({args})"


def model_card(trainer: L.Trainer, module: Any, alphas: list[float], config_path: str | None = None) -> str:
    """The export's ``README.md``: what was trained from what, on what, how, and how well. The objective
    and controller are given as the run's config (``config_path``) has them: a controller moves α, whose
    course is its own line."""
    data = trainer.datamodule
    controller = getattr(module, "alpha_controller", None)
    objective, controller_text = repr(module.objective), repr(controller) if controller else None
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            configured = (yaml.safe_load(f) or {}).get("model") or {}
        objective = _as_configured(configured.get("objective")) or objective
        controller_text = _as_configured(configured.get("alpha_controller")) or controller_text
    elif controller:  # α in the objective is the controller's, not a setting: name the class alone
        objective = type(module.objective).__name__
    name = module.hparams.get("model", "?")
    base = EMBEDDED_SOURCE if is_embedded(name) else name if not os.path.exists(os.path.expanduser(name)) else None
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {base}"] if base else []),
        "tags: [bnll_lightning, sft]",
        "---",
        "",
        "# Fine-tuned with bnll_lightning",
        "",
        f"- **Base model:** {describe_model(name)}",
        f"- **Objective:** `{objective}`" + (f", α controller `{controller_text}`" if controller_text else ""),
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
    if config_path:
        lines.append("python -m bnll_lightning fit --config training_config.yaml   # the run's resolved config")
    lines += [f"# as launched: python -m bnll_lightning {shlex.join(sys.argv[1:])}", "```", ""]
    return "\n".join(lines)
