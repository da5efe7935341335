"""Resume after a kill, and determinism: the trajectories of alpha, loss and LR are those of an uninterrupted run.

The interrupted run is a real ``python -m bnll_lightning fit`` process, SIGKILLed in the middle of
an optimizer step in the middle of its second epoch; ``fit --ckpt_path last`` then continues it.
Mid-epoch is the hard part: the resumed epoch must go on with the batches the killed one had not
reached yet (a restarted sampler would feed different batches and change every later value). The
model has attention dropout, so the random generators must resume where they were too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning.cli import main

TESTS = Path(__file__).parent
STEPS, EVERY, KILL_AFTER = 10, 3, 6  # 4 optimizer steps per epoch: step 6 is half-way through epoch 2
TAGS = ("train/loss", "train/alpha", "train/mean_p_ema", "train/mean_p", "lr-AdamW/pg1")


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
                                 "init_args": {"low": 1.0e-5, "high": 1.0e-3, "ema_decay": 0.5, "max_delta": 0.2}},
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


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout: every training step draws from the global generator."""
    out = tmp_path_factory.mktemp("dropout_model") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.2
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", write(root / "fit.yaml", config(dropout_model_dir, root / "runs"))])
    return scalars(only_version(root / "runs"))


def test_same_seed_same_trajectory(uninterrupted, dropout_model_dir, tmp_path):
    main(["fit", "--config", write(tmp_path / "fit.yaml", config(dropout_model_dir, tmp_path / "runs"))])
    again = scalars(only_version(tmp_path / "runs"))
    assert len(uninterrupted["train/loss"]) == STEPS
    for tag in TAGS:
        assert again[tag] == uninterrupted[tag], tag  # bit-identical on the same machine


@pytest.mark.slow  # processes of their own: in `make test`, not in the fast loop
def test_killed_mid_epoch_then_resumed_matches_uninterrupted(uninterrupted, dropout_model_dir, tmp_path):
    runs = tmp_path / "runs"
    killer = {"class_path": "_killer.KillMidStep", "init_args": {"step": KILL_AFTER}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           # The thread count of this process (conftest): float reductions, hence Adam's steps, then match.
           "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(
        [sys.executable, "-m", "bnll_lightning", "fit",
         "--config", write(tmp_path / "killed.yaml", config(dropout_model_dir, runs, [killer]))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    log_dir = only_version(runs)
    ckpts = log_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file(), sorted(p.name for p in ckpts.iterdir())
    state = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert state["global_step"] == KILL_AFTER and state["epoch"] == 1  # mid-way through the second epoch
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "batches": 4}]  # 2 of its 4 optimizer steps done

    main(["fit", "--config", write(tmp_path / "fit.yaml", config(dropout_model_dir, runs)), "--ckpt_path", "last"])
    assert only_version(runs) == log_dir  # logged into the same version as the killed run
    resumed = scalars(log_dir)
    for tag in TAGS:
        tail = {step: v for step, v in uninterrupted[tag].items() if step >= KILL_AFTER}
        assert len(tail) >= STEPS - KILL_AFTER, (tag, uninterrupted[tag])
        got = {step: resumed[tag][step] for step in tail if step in resumed.get(tag, {})}
        assert got == pytest.approx(tail, rel=1e-6, abs=1e-9), tag


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_continues_the_epoch_where_it_stopped(num_workers):
    from bnll_lightning.sampling import ResumableDataLoader, ResumableSampler

    def loader():
        data = list(range(11))
        return ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=7), num_workers=num_workers)

    full = loader()
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]
    assert len(expected) == 4 and sorted(sum(expected, [])) == list(range(11))

    killed = loader()
    killed.sampler.set_epoch(2)
    it = iter(killed)
    consumed = [next(it).tolist() for _ in range(2)]
    state = killed.state_dict()
    assert state == {"epoch": 2, "batches": 2} and consumed == expected[:2]

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # what Lightning does before the epoch's first batch
    assert len(resumed) == 4  # the epoch keeps its length for Lightning's bookkeeping
    assert [b.tolist() for b in resumed] == expected[2:]
    assert resumed.state_dict() == {"epoch": 2, "batches": 4}
    resumed.sampler.set_epoch(3)
    assert len([b for b in resumed]) == 4  # the next epoch is whole again


def test_sampler_shards_ranks_disjointly_and_orders_by_epoch():
    from bnll_lightning.sampling import ResumableSampler

    data = list(range(10))
    shards = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == data
    again = ResumableSampler(data, num_replicas=2, rank=0, seed=0)
    assert list(again) == shards[0]  # a function of (seed, epoch): no hidden generator state
    again.set_epoch(1)
    assert list(again) != shards[0]
