"""The run that tests/test_resume.py and tests/test_signals.py interrupt, and how its TensorBoard scalars are read."""

from __future__ import annotations

from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TESTS = Path(__file__).parent
STEPS, EVERY = 10, 3  # 4 optimizer steps per epoch (16 rows, batches of 2, 2 micro-batches a step)
TAGS = ("train/loss", "train/alpha", "train/statistic_ema", "train/mean_p", "lr-AdamW/pg1")


def config(model_dir: str, save_dir: Path, callbacks: list | None = None) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": STEPS, "accumulate_grad_batches": 2, "log_every_n_steps": 1, "limit_val_batches": 0,
            "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(save_dir), "name": "auto"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": EVERY, "save_top_k": -1}},
                          *(callbacks or [])],
        },
        "model": {
            "model": model_dir,
            "objective": {"class_path": "bnll_lightning.objectives.AlphaFamily", "init_args": {"alpha": 0.0}},
            # Thresholds around the random model's p (~2e-5) and a fast EMA: alpha moves every step.
            "alpha_controller": {"class_path": "bnll_lightning.alpha.AdaptiveAlpha",
                                 "init_args": {"low": 1.0e-5, "high": 1.0e-3, "ema_decay": 0.5, "max_delta": 0.2,
                                               "statistic": "mean"}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3}},
            "warmup": 2,
            "histogram_every_n_steps": 0,
        },
        "data": {"train": "builtin:sort", "num_train": 16, "num_val": 0, "batch_size": 2, "max_length": 96},
    }


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def only_version(save_dir: Path) -> Path:
    (log_dir,) = save_dir.glob("*/version_*")
    return log_dir
