"""Run by tests/test_fsdp2.py under ``torchrun --nproc_per_node 2``: FSDP2 fits on 2 CPU ranks (gloo).

Three fits of 4 optimizer steps, built by the CLI from ``configs/demo.yaml`` + ``configs/objectives/nll.yaml``:
``ddp`` (unsharded reference), ``fsdp2`` (sharded, a sharded checkpoint every 2 steps) and ``resumed``
(FSDP2 again, resumed from the step-2 checkpoint). Each exports a ``save_pretrained`` directory; rank 0
writes ``<out>/results.pt`` with every fit's per-step losses and directories.
Usage: _fsdp2_worker.py OUT MODEL_DIR
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from bnll_lightning.cli import load_from_config  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
torch.set_num_threads(1)


class Losses(L.Callback):
    """The step's token-exact loss (summed over ranks), as the module logged it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = pl_module.last_step_stats
        self.losses.append(s["loss_sum"] / s["normalizer"])


def fit(out: str, model_dir: str, name: str, strategy: dict, ckpt_path: str | None = None) -> dict:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": os.path.join(out, f"ckpt_{name}"), "filename": "{step}",
                                "every_n_train_steps": 2, "save_top_k": -1}}
    cli = load_from_config([
        "--config", os.path.join(CONFIGS, "demo.yaml"), "--config", os.path.join(CONFIGS, "objectives", "nll.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        "--trainer.strategy", json.dumps(strategy), "--trainer.callbacks", json.dumps([checkpoint]),
        "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", os.path.join(out, f"runs_{name}"),
        "--model.model", model_dir, "--model.export_dir", os.path.join(out, f"export_{name}"),
        "--model.optimizer.init_args.lr", "1e-2",  # the job's fused AdamW, on sharded (DTensor) parameters
        "--model.histogram_every_n_steps", "0",
        "--data.train", "builtin:sort", "--data.num_train", "24", "--data.num_val", "0", "--data.batch_size", "3",
    ])
    losses = Losses()
    cli.trainer.callbacks.append(losses)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    (optimizer,) = cli.trainer.optimizers
    return {"losses": losses.losses, "groups": [len(g["params"]) for g in optimizer.param_groups],
            "group_numel": [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups], "export": os.path.join(out, f"export_{name}"),
            "checkpoints": os.path.join(out, f"ckpt_{name}"), "global_step": cli.trainer.global_step,
            "strategy": type(cli.trainer.strategy).__name__}


def main(out: str, model_dir: str) -> None:
    fsdp2 = {"class_path": "bnll_lightning.strategies.FSDP2Strategy"}
    results = {"ddp": fit(out, model_dir, "ddp", {"class_path": "lightning.pytorch.strategies.DDPStrategy"}),
               "fsdp2": fit(out, model_dir, "fsdp2", fsdp2)}
    results["resumed"] = fit(out, model_dir, "resumed", fsdp2,
                             ckpt_path=os.path.join(results["fsdp2"]["checkpoints"], "step=2.ckpt"))
    if torch.distributed.get_rank() == 0:
        torch.save(results, os.path.join(out, "results.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Destroyed here, not at interpreter exit: there, on a loaded machine, rank 0 once aborted after every fit
    # had passed ('terminate called without an active exception' from the process group's threads).
    torch.distributed.destroy_process_group()
