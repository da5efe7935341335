"""Resume after a kill, and determinism: the trajectories of alpha, loss and LR are those of an uninterrupted run.

The interrupted run is a real ``python -m bnll_lightning fit`` process, SIGKILLed in the middle of
an optimizer step in the middle of its second epoch; ``fit --ckpt_path last`` then continues it.
Mid-epoch is the hard part: the resumed epoch must go on with the batches the killed one had not
reached yet (a restarted sampler would feed different batches and change every later value). The
model has attention dropout, so the random generators must resume where they were too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _resume_run import STEPS, TAGS, TESTS, config, only_version, scalars, write
from bnll_lightning.cli import main

KILL_AFTER = 6  # step 6 is half-way through epoch 2


def test_same_seed_same_trajectory(uninterrupted_run, dropout_model_dir, tmp_path):
    main(["fit", "--config", write(tmp_path / "fit.yaml", config(dropout_model_dir, tmp_path / "runs"))])
    again = scalars(only_version(tmp_path / "runs"))
    assert len(uninterrupted_run["train/loss"]) == STEPS
    for tag in TAGS:
        assert again[tag] == uninterrupted_run[tag], tag  # bit-identical on the same machine


@pytest.mark.slow  # processes of their own: in `make test`, not in the fast loop
def test_killed_mid_epoch_then_resumed_matches_uninterrupted(uninterrupted_run, dropout_model_dir, tmp_path):
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
        tail = {step: v for step, v in uninterrupted_run[tag].items() if step >= KILL_AFTER}
        assert len(tail) >= STEPS - KILL_AFTER, (tag, uninterrupted_run[tag])
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
