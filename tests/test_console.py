"""A fit's console: a short header, the training bar, one line per validation, a summary; the rest on request."""

from __future__ import annotations

import re

from bnll_lightning.cli import main


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
    fit(tmp_path, tiny_model_dir)
    out, err = capfd.readouterr()
    (log_dir,) = (tmp_path / "runs").glob("*/version_*")
    printed = [line for line in lines(out) if not line.startswith(("epoch 0, step", "Training"))]  # the bar
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
    bar = [line for line in lines(out) if line.startswith("epoch 0, step")][-1]
    assert re.search(r"4/4 .*loss=\S+, mean p=\S+\]$", bar)  # one bar: the step, the loss, the mean p
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
