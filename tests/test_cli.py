"""The command line: every shipped config parses; a fit on a tiny model writes logs and a loadable model."""

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning.cli import main, run_name

CONFIGS_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "math_qwen.yaml"} <= names
    overlays = {p.name for p in (CONFIGS_DIR / "objectives").glob("*.yaml")}
    assert {"nll.yaml", "negprob.yaml", "alpha10.yaml", "thresholded.yaml", "dft.yaml", "adaptive.yaml"} <= overlays


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]
    assert printed["data"]["train"]
    written = yaml.safe_load(config.read_text()).get("model") or {}
    for group in ("loading", "streaming", "lora"):  # the argument groups (dataclasses) take what the config sets
        for key, value in (written.get(group) or {}).items():
            assert printed["model"][group][key] == value, (group, key)


def test_help_lists_the_argument_groups(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for option in ("--model.streaming.chunk_size", "--model.streaming.head_float32", "--model.lora.r",
                   "--model.lora.load_in_4bit", "--model.loading.dtype", "--model.loading.trust_remote_code",
                   "--model.loading.gradient_checkpointing"):
        assert option in text, option
    # The group's docstring is its help: a user finds what moved into it.
    assert "How the model is loaded and run" in text
    assert "--model.dtype" not in text and "--model.gradient_checkpointing" not in text


def test_run_name_tells_objectives_apart():
    assert run_name({"objective": None}) == "NLL"
    assert run_name({"objective": {"class_path": "bnll_lightning.objectives.AlphaFamily",
                                   "init_args": {"alpha": 10}}}) == "AlphaFamily-alpha10.0"
    assert run_name({"objective": {"class_path": "bnll_lightning.objectives.ThresholdedNLL",
                                   "init_args": {"tau": 0.2}}}) == "ThresholdedNLL-tau0.2"
    name = run_name({"objective": {"class_path": "bnll_lightning.objectives.AlphaFamily", "init_args": {"alpha": 0}},
                     "alpha_controller": {"class_path": "bnll_lightning.alpha.AdaptiveAlpha"}})
    assert name == "AdaptiveAlpha-AlphaFamily-alpha0.0"


def fit(tmp_path, tiny_model_dir, *extra):
    save_dir = tmp_path / "runs"
    main([
        "fit", "--config", str(CONFIGS_DIR / "demo.yaml"), "--config", str(CONFIGS_DIR / "objectives" / "nll.yaml"),
        "--model.model", tiny_model_dir,
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--data.train", "builtin:add", "--data.num_train", "32", "--data.num_val", "8", "--data.batch_size", "4",
        *extra,
    ])
    (log_dir,) = [p for p in save_dir.glob("*/version_*")]
    return log_dir


def test_fit_writes_tensorboard_tags_and_loadable_model(tmp_path, tiny_model_dir, monkeypatch):
    from bnll_lightning.checkpoint_io import DirectCheckpointIO

    saved, save = [], DirectCheckpointIO.save_checkpoint
    monkeypatch.setattr(DirectCheckpointIO, "save_checkpoint",
                        lambda self, state, path, **kw: (saved.append(str(path)), save(self, state, path, **kw)))
    log_dir = fit(tmp_path, tiny_model_dir, "--model.objective", "bnll_lightning.objectives.AlphaFamily",
                  "--model.objective.alpha", "1.0")
    # Its checkpoints went through DirectCheckpointIO (no in-memory copy: tests/test_checkpoint_io.py).
    assert saved and all(p.startswith(str(log_dir)) for p in saved) and (log_dir / "checkpoints" / "last.ckpt").exists()
    assert log_dir.parent.name == "AlphaFamily-alpha1.0"  # the directory says which objective ran
    values = scalars(log_dir)
    for tag in ["train/loss", "train/nll", "train/mean_p", "train/alpha", "val/nll", "val/mean_p", "val/token_accuracy"]:
        assert tag in values, f"{tag} missing from {sorted(values)}"
    assert len(values["train/loss"]) == 4  # one point per optimizer step
    assert all(a == 1.0 for a in values["train/alpha"])
    assert all(0.0 < p < 1.0 for p in values["train/mean_p"])
    # alpha = 1: loss = 1 - mean p, token-weighted over the same tokens
    for loss, p in zip(values["train/loss"], values["train/mean_p"]):
        assert loss == pytest.approx(1 - p, abs=1e-5)
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert config["model"]["objective"]["init_args"]["alpha"] == 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = log_dir / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any((a != b).any() for a, b in zip(model.parameters(), base.parameters()))
    assert changed, "the exported model should hold the fine-tuned weights"


def test_fit_with_selecting_objective_logs_selected_fraction(tmp_path, tiny_model_dir):
    log_dir = fit(tmp_path, tiny_model_dir, "--model.objective", "bnll_lightning.objectives.TopFraction",
                  "--model.objective.fraction", "0.5", "--trainer.limit_val_batches", "0")
    values = scalars(log_dir)
    assert "train/alpha" not in values  # no alpha for objectives outside the family
    for fraction in values["train/selected_fraction"]:
        assert 0.5 <= fraction <= 0.6  # ceil(0.5 n) of n tokens per micro-batch


def test_study_help_shows_the_studys_own_options_first(capsys):
    main(["study", "--help"])  # without building the fit parser: its ~780 lines are fit --help's
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m bnll_lightning study ")
    assert "Lightning Trainer command line tool" not in text and len(text.splitlines()) < 100
    for option in ("--config", "--objectives", "--seeds", "--max_steps", "--val_rows", "--checker", "--out"):
        assert option in text, option
    assert "needs --checker" in text and "python -m bnll_lightning fit --help" in text


def test_study_help_imports_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import runpy, sys; sys.argv = ['bnll_lightning', 'study', '--help']; "
            "runpy.run_module('bnll_lightning', run_name='__main__'); "
            "print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python -m bnll_lightning study ") and out.rstrip().endswith("heavy: []")


def test_the_study_options_written_out_match_the_package():
    from bnll_lightning import study_args
    from bnll_lightning.evaluate import CHECKERS, GenerationArgs

    assert study_args.CHECKER_NAMES == tuple(CHECKERS)
    assert study_args.DEFAULT_MAX_NEW_TOKENS == GenerationArgs.max_new_tokens


def test_a_study_of_own_data_warns_of_no_seed_nor_leafspec(tmp_path, tiny_model_dir, capsys):
    import json
    import warnings

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                            for i in range(24)))
    job = tmp_path / "job.yaml"  # a minimal own-data job: no seed_everything
    job.write_text(yaml.safe_dump({"model": {"model": tiny_model_dir}, "data": {"train": str(rows), "batch_size": 4},
                                   "trainer": {"max_steps": 2, "logger": False}}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # past pytest's own filters (pyproject.toml ignores LeafSpec's)
        main(["study", "--config", str(job), "--objectives", "nll", "--seeds", "1", "--val_rows", "4",
              "--max_new_tokens", "2", "--checker", "exact", "--out", str(tmp_path / "study")])
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "No seed found" in m or "LeafSpec" in m], messages
    assert "| nll | 1 |" in capsys.readouterr().out  # the study ran its one run
