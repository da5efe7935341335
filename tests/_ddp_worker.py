"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: one-step fits on 2 CPU ranks.

Each fit is built by the CLI from ``configs/demo.yaml`` + ``configs/objectives/nll.yaml`` + ``configs/ddp.yaml`` (the documented
launch: torchrun starts the processes, Lightning joins them), with SGD at lr = 1 so that the
exported weights are theta_0 - gradient. Rank 0 writes ``<out>/<name>.pt`` with every rank's
micro-batch target counts, the module's reduced step statistics and the run's log directory.
Usage: _ddp_worker.py OUT MODEL_DIR TAU
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _exactness import TargetCounts  # noqa: E402
from bnll_lightning.cli import load_from_config  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "configs"
torch.set_num_threads(1)


def cli_args(out: str, model_dir: str, name: str, objective: dict, controller: dict | None) -> list[str]:
    args = [
        "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "nll.yaml"), "--config", str(CONFIGS / "ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        # 12 rows = 2 ranks x accumulate 2 x batch 3: the one optimizer step consumes every row.
        "--trainer.max_steps", "1", "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "null",
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.logger.init_args.save_dir", os.path.join(out, f"runs_{name}"),
        "--model.model", model_dir, "--model.objective", json.dumps(objective),
        # weight_decay given: init_args of the config's AdamW that SGD also accepts would carry over.
        "--model.optimizer", json.dumps({"class_path": "torch.optim.SGD",
                                         "init_args": {"lr": 1.0, "weight_decay": 0.0}}),
        "--model.warmup", "0", "--model.histogram_every_n_steps", "0",
        "--data.train", "builtin:sort", "--data.num_train", "12", "--data.num_val", "0", "--data.batch_size", "3",
    ]
    if controller is not None:
        args += ["--model.alpha_controller", json.dumps(controller)]
    return args


def plateau(out: str, model_dir: str) -> None:
    """PlateauAlpha(restore_best) over 3 steps, validated after each: a rise at the second validation (min_delta
    100: nothing after the first is an improvement) restores step 1's checkpoint on both ranks. Rank 0 writes
    ``<out>/plateau.pt``: every rank's controller state and a fingerprint of its weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    controller = {"class_path": "bnll_lightning.alpha.PlateauAlpha", "init_args": {"restore_best": True, "min_delta": 100, "monitor": "val/nll", "mode": "min", "before_rise": "nll"}}
    objective = {"class_path": "bnll_lightning.objectives.AlphaFamily", "init_args": {"alpha": 0.0}}
    cli = load_from_config(cli_args(out, model_dir, "plateau", objective, controller) + [
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--data.num_val", "4"])
    module, trainer = cli.model, cli.trainer
    best = ModelCheckpoint(dirpath=os.path.join(out, "plateau_best"), filename="{step}", monitor="val/nll", save_top_k=1)
    trainer.callbacks.append(best)
    trainer.fit(module, datamodule=cli.datamodule)
    fingerprint = [float(p.double().sum()) for p in module.parameters()]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"controller": module.alpha_controller.state_dict(), "weights": fingerprint})
    if trainer.is_global_zero:
        torch.save({"ranks": ranks, "best": best.best_model_path}, os.path.join(out, "plateau.pt"))


def main(out: str, model_dir: str, tau: float) -> None:
    runs = {
        "alpha": ({"class_path": "bnll_lightning.objectives.AlphaFamily", "init_args": {"alpha": 0.0}},
                  {"class_path": "bnll_lightning.alpha.AdaptiveAlpha", "init_args": {"initial": 0.5, "ema_decay": 0.0, "low": 0.1, "high": 0.55, "statistic": "mean"}}),
        "thresholded": ({"class_path": "bnll_lightning.objectives.ThresholdedNLL", "init_args": {"tau": tau}}, None),
    }
    for name, (objective, controller) in runs.items():
        cli = load_from_config(cli_args(out, model_dir, name, objective, controller))
        module, trainer = cli.model, cli.trainer
        alpha_used = module.objective.alpha
        counts = TargetCounts()
        trainer.callbacks.append(counts)
        trainer.fit(module, datamodule=cli.datamodule)
        all_counts = [None] * dist.get_world_size()
        dist.all_gather_object(all_counts, counts.counts)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero:
            torch.save({
                "log_dir": log_dir,
                "stats": module.last_step_stats,
                "ema": None if module.alpha_controller is None else module.alpha_controller.ema,
                "alpha_used": alpha_used,
                "counts": all_counts,
                "world_size": trainer.world_size,
            }, os.path.join(out, f"{name}.pt"))
    plateau(out, model_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    # Destroyed here, not at interpreter exit: there, on a loaded machine, rank 0 once aborted after every fit
    # had passed ('terminate called without an active exception' from the process group's threads).
    dist.destroy_process_group()
