"""A fit's console: a short header, the training bar (plain lines in a file), one line per validation, a summary."""

from __future__ import annotations

import re

from bnll_lightning import console
from bnll_lightning.callbacks import StepProgressBar
from bnll_lightning.cli import SFTCLI, load_from_config, main


def fit(tmp_path, model_dir, *extra):
    main(["fit", "--model.model", model_dir, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--data.train", "builtin:sort",
          "--data.num_train", "16", "--data.num_val", "4", "--data.batch_size", "4",
          "--trainer.callbacks+=bnll_lightning.callbacks.GenerationEval", "--trainer.callbacks.num_rows", "4",
          "--trainer.callbacks.max_new_tokens", "4", *extra])


def lines(text: str) -> list[str]:
    """What a terminal keeps: each carriage-return-separated redraw of the bar is one line too."""
    return [part for line in text.splitlines() for part in line.split("\r") if part.strip()]


def test_a_fit_prints_a_header_the_bar_a_line_per_validation_and_a_summary(tmp_path, tiny_model_dir, capfd):
    fit(tmp_path, tiny_model_dir)  # stdout is pytest's file here, not a terminal: the bar is plain lines
    out, err = capfd.readouterr()
    (log_dir,) = (tmp_path / "runs").glob("*/version_*")
    # Not the bar's lines, nor the disk report (disk.py's, tested in test_disk.py).
    printed = [line for line in lines(out) if not re.match(r"step |disk |\s+[\d.]+ [kMGT]?B  ", line)]
    assert printed == [
        f"model      {tiny_model_dir}",
        "data       builtin:sort: 16 training rows, 4 validation rows",
        "objective  NLL()",
        "training   4 optimizer steps of 4 rows",
        f"logs       {log_dir}  (tensorboard --logdir {tmp_path / 'runs'})",
        *[line for line in printed if line.startswith("validation after step")],
        *printed[-4:],
    ]
    validations = [line for line in printed if line.startswith("validation after step")]
    assert [line.split(" (")[0] for line in validations] == ["validation after step 2/4", "validation after step 4/4"]
    assert all(re.search(r"val/accuracy \S+ · val/mean_p \S+ · val/nll \S+ · val/token_accuracy \S+$", v)
               for v in validations)
    summary = r"done in \d+ s, 4 optimizer steps: train/alpha 0 · train/loss \S+ · train/mean_p \S+ · train/nll \S+"
    assert re.fullmatch(summary, printed[-4]), printed[-4]
    assert printed[-3].startswith("  final  val/accuracy ")
    assert printed[-2:] == [f"model      {log_dir / 'hf_model'}",
                            f"logs       tensorboard --logdir {tmp_path / 'runs'}"]
    # The bar in a file: no carriage-return redraws, a short line per step (a tenth of 4 steps), the
    # step, the time, α, the loss and the mean p.
    bar = [line for line in out.splitlines() if line.startswith("step ")]
    assert "\r" not in out and max(len(line) for line in bar) < 200  # (other lines hold paths of any length)
    assert [line.split(" (")[0] for line in bar] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert all(re.fullmatch(r"step \d/4 \(\d+ s\): α 0 · loss \S+ · mean p \S+", line) for line in bar), bar
    # Nothing else: no devices, tips, model summary, seed, loading or validation bars, source lines of warnings.
    noise = ("GPU available", "Tip:", "Params", "Seed set", "Loading weights", "Writing model", "Validation",
             "LeafSpec", "warnings.warn")
    assert not [line for line in lines(out + err) if any(word in line for word in noise)], err


def test_verbosity_all_shows_what_lightning_and_transformers_print(tmp_path, tiny_model_dir, capfd):
    fit(tmp_path, tiny_model_dir, "--verbosity", "all")
    out, err = capfd.readouterr()
    everything = out + err
    # (Lightning's INFO lines, "GPU available" and the like, go to pytest's log capture here, not to the terminal.)
    assert "Trainable params" in everything and "Validation" in everything and "Writing model shards" in everything
    assert "model      " in out and "done in " in out  # the header and the summary too


def test_the_bar_draws_in_a_terminal_and_prints_lines_elsewhere(tiny_model_dir, monkeypatch):
    args = ["--model.model", tiny_model_dir, "--trainer.max_steps", "2", "--trainer.logger", "false"]
    monkeypatch.setattr(console, "terminal", lambda: True)
    cli = load_from_config(args, SFTCLI)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar) and bar.is_enabled
    assert not [c for c in cli.trainer.callbacks if isinstance(c, console.StepLines)]
    monkeypatch.setattr(console, "terminal", lambda: False)
    cli = load_from_config(args, SFTCLI)
    assert cli.trainer.progress_bar_callback.is_disabled  # Lightning's switch: the bar keeps its values, draws nothing
    assert len([c for c in cli.trainer.callbacks if isinstance(c, console.StepLines)]) == 1


def test_step_lines_every_n_steps_and_at_the_last(tmp_path, capsys):
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, callbacks=[console.StepLines(every_n_steps=3)],
                        limit_val_batches=0, accumulate_grad_batches=2, default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(BoringModel())
    steps = [line.split(" (")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == ["step 3/7", "step 6/7", "step 7/7"]  # optimizer steps, not micro-batches; and the last
