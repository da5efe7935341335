"""The end-of-fit export: a loadable save_pretrained directory with a model card and the run's config."""

import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning.cli import main

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
    card = (export / "README.md").read_text()
    assert f"`{tiny_model_dir}`" in card and "LinearAlpha" in card and "builtin:add" in card
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

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(export).config.vocab_size > 0
