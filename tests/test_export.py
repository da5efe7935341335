"""The end-of-fit export: a loadable save_pretrained directory with a model card and the run's config, written whole or not
at all; directories that cannot be written found before training; the weights kept when the export fails."""

import os
import re
import shlex
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from safetensors import safe_open

from bnll_lightning import disk
from bnll_lightning.alpha import LinearAlpha
from bnll_lightning.cli import main
from bnll_lightning.data import SFTDataModule
from bnll_lightning.export import HFExport, replace_directory, save_pretrained, unwritable_reason
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import AlphaFamily

CONFIGS = Path(__file__).parents[1] / "configs"


def test_fit_exports_model_card_and_config(tmp_path, tiny_model_dir, capsys):
    save_dir = tmp_path / "runs"
    main([
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "linear.yaml"),
        "--model.model", tiny_model_dir, "--model.alpha_controller.init_args.steps", "3",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.callbacks", "[]",
        "--data.train", "builtin:add", "--data.num_train", "12", "--data.num_val", "4", "--data.batch_size", "4",
    ])
    (log_dir,) = list(save_dir.glob("*/version_*"))
    export = log_dir / "hf_model"
    # The console's last lines: what the run left, per place, as the files' sizes add up.
    printed = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("disk       "))
    said = {line.split()[2]: line.split()[0:2] for line in printed[start + 1:]}
    checkpoints = log_dir / "checkpoints"
    places = {"checkpoints": checkpoints, "export": export, "logs": log_dir}
    for name, folder in places.items():
        inner = [p for p in places.values() if p != folder and folder in p.parents]
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()
                   and not any(p in f.parents for p in inner))  # fmt: skip
        assert " ".join(said[name]) == disk.human(size) and printed[start + 1:][list(said).index(name)].endswith(
            str(folder)), name
    assert list(checkpoints.glob("*.ckpt")) and {"checkpoints", "export", "logs"} == set(said)
    with safe_open(str(export / "model.safetensors"), "pt") as f:  # the tied output embedding: stored once
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    card = (export / "README.md").read_text()
    assert f"**Base model:** {tiny_model_dir}" in card and "builtin:add" in card
    # The objective as configured (α 0.0), the controller that moved α, and α's course apart (it ended elsewhere).
    assert "**Objective:** `AlphaFamily(alpha=0.0" in card and "α controller `LinearAlpha(start=0.0, end=1.0" in card
    assert "3 optimizer steps" in card
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    alphas = [e.value for e in acc.Scalars("train/alpha")]
    line = re.search(r"α over (\d+) optimizer steps:\*\* start (\S+), end (\S+), mean (\S+)", card)
    assert line and int(line[1]) == len(alphas) == 3
    assert [float(line[2].rstrip(",")), float(line[3].rstrip(","))] == pytest.approx([alphas[0], alphas[-1]], rel=1e-3)
    assert float(line[4]) == pytest.approx(sum(alphas) / 3, rel=1e-3)
    assert "`val/nll`" in card  # the final validation metrics
    # The card's command reproduces the run: its config is the run's own, and it parses.
    assert "python -m bnll_lightning fit --config training_config.yaml" in card
    config = yaml.safe_load((export / "training_config.yaml").read_text())
    assert config == yaml.safe_load((log_dir / "config.yaml").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(export / "training_config.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["alpha_controller"]["init_args"]["steps"] == 3

    assert AutoModelForCausalLM.from_pretrained(export).config.vocab_size > 0


class ModuleHookFirst(L.Callback):
    """Runs the module's on_before_optimizer_step ahead of the other callbacks' (Lightning runs it after them)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        SFTModule.on_before_optimizer_step(pl_module, optimizer)


class HookRunByCallback(SFTModule):
    def on_before_optimizer_step(self, optimizer):
        pass  # ModuleHookFirst runs it


@pytest.mark.parametrize("module_first", [False, True])
def test_the_card_has_the_alpha_each_step_trained_with_in_either_hook_order(module_first, tmp_path, tiny_model_dir):
    module_class, callbacks = (HookRunByCallback, [ModuleHookFirst()]) if module_first else (SFTModule, [])
    module = module_class(model=tiny_model_dir, objective=AlphaFamily(), alpha_controller=LinearAlpha(steps=3),
                          export_dir=str(tmp_path / "export"))
    data = SFTDataModule(train="builtin:sort", num_train=12, num_val=0, batch_size=2, tokenizer=module.tokenizer)
    export = HFExport(model_card=False)
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[*callbacks, export], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert export.alphas == pytest.approx([0.0, 1 / 3, 2 / 3])  # LinearAlpha's α (0 to 1) before each update


# ----------------------------------------------------------------------------- directories that cannot take it


def fit_args(model_dir, tmp_path, *extra):
    return ["fit", "--model.model", model_dir, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--data.train", "builtin:add", "--data.num_train", "8", "--data.num_val", "0", "--data.batch_size", "4",
            "--model.histogram_every_n_steps", "0", *extra]


@pytest.mark.parametrize("option", ["--model.export_dir", "--trainer.logger.init_args.save_dir"])
def test_an_unwritable_output_directory_is_one_line_before_anything_loads(option, read_only_dir, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    target = read_only_dir / "out"
    # A model that does not exist: the directories are checked before it would load.
    with pytest.raises(SystemExit) as stopped:
        main([*fit_args("/nonexistent/model", tmp_path), option, str(target)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"bnll_lightning: config error: {option[2:]}: {target} cannot be written ({read_only_dir}: ")
    assert not list(tmp_path.glob("runs/*/version_*"))  # nothing ran, nothing left behind


def test_unwritable_reason_names_the_folder_and_the_cause(read_only_dir, tmp_path):
    assert unwritable_reason(str(tmp_path / "new" / "deeper")) is None  # creatable
    assert unwritable_reason(str(read_only_dir / "x")).startswith(f"{read_only_dir}: ")
    (tmp_path / "file").write_text("")
    assert "is a file" in unwritable_reason(str(tmp_path / "file"))


def test_a_full_disk_at_export_leaves_no_partial_model_and_keeps_the_weights_resumable(
        full_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):  # fmt: skip
    """Checkpointing off: before, the export's traceback came after the last step and the trained weights were gone."""
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    export = full_dir / "model"
    args = fit_args(tiny_model_dir, tmp_path, "--trainer.enable_checkpointing", "false", "--model.export_dir", str(export))
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err, err
    assert not export.exists() and not list(full_dir.iterdir())  # no config without weights, no partial folder
    (log_dir,) = tmp_path.glob("runs/*/version_*")
    checkpoint = log_dir / "checkpoints" / "last-export-failed.ckpt"
    assert f"bnll_lightning: export to {export} failed (" in err and "No space left on device" in err
    assert f"the trained weights are in the checkpoint {checkpoint}" in err
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert state["global_step"] == 2

    (command,) = [line.split("with: ", 1)[1] for line in err.splitlines() if line.startswith("export them")]
    python, dash_m, package, *again = shlex.split(command)
    assert again == [*args, "--ckpt_path", str(checkpoint)]
    elsewhere = tmp_path / "exported"
    main([*again, "--model.export_dir", str(elsewhere)])  # trains nothing more: exports the checkpoint's weights
    exported = AutoModelForCausalLM.from_pretrained(elsewhere).state_dict()
    for key, value in state["state_dict"].items():
        if key.startswith("model."):
            torch.testing.assert_close(exported[key[len("model."):]], value, msg=key)
    assert not checkpoint.exists()  # exported: the stop-gap checkpoint is gone


def test_replace_directory_swaps_in_a_complete_folder_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def fail(folder):
        Path(folder, "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_directory(str(target), fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "old.txt").exists()
    replace_directory(str(target), lambda folder: Path(folder, "new.txt").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and sorted(os.listdir(target)) == ["new.txt"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_card_of_the_embedded_model_names_the_model_and_its_source():
    from types import SimpleNamespace

    from bnll_lightning.export import model_card
    from bnll_lightning.objectives import AlphaFamily

    module = SimpleNamespace(hparams={"model": "embedded"}, objective=AlphaFamily(0.25), alpha_controller=None)
    trainer = SimpleNamespace(datamodule=None, global_step=2, precision="32-true", world_size=1, callback_metrics={})
    card = model_card(trainer, module, [0.25, 0.25])
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "**Base model:** SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct, from the " in card
    assert "`embedded`" not in card and "**Objective:** `AlphaFamily(alpha=0.25)`" in card


def test_a_gathered_state_dict_stores_tied_weights_once(tmp_path, tiny_model_dir, tokenizer):
    from types import SimpleNamespace

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.tie_word_embeddings
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # as FSDP gathers it: a copy per key
    save_pretrained(SimpleNamespace(model=model, tokenizer=tokenizer), str(tmp_path / "sharded"), gathered)
    save_pretrained(SimpleNamespace(model=model, tokenizer=tokenizer), str(tmp_path / "whole"))
    files = [tmp_path / d / "model.safetensors" for d in ("sharded", "whole")]
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert files[0].stat().st_size == files[1].stat().st_size
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
