"""SIGTERM during fit: a checkpoint at the next step boundary, exit code 143, a resume command that continues exactly."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from _resume_run import STEPS, TAGS, TESTS, config, only_version, scalars, write
from bnll_lightning.cli import main, resume_command
from bnll_lightning.signals import CHECKPOINT_NAME, EXIT_CODE



def resumed_matches(runs, uninterrupted_scalars, stopped_at: int) -> None:
    """The one log version of ``runs`` holds the uninterrupted run's trajectory from ``stopped_at`` on."""
    resumed = scalars(only_version(runs))
    for tag in TAGS:
        tail = {step: v for step, v in uninterrupted_scalars[tag].items() if step >= stopped_at}
        assert len(tail) >= STEPS - stopped_at, (tag, uninterrupted_scalars[tag])
        assert {step: resumed[tag].get(step) for step in tail} == pytest.approx(tail, rel=1e-6, abs=1e-9), tag


# The signal arrives at the first of a step's two micro-batches (4 steps an epoch): in the middle of the
# second epoch, or in the step that ends the first (the next epoch's loader starts before the next batch).
@pytest.mark.parametrize("term_at, loader", [(5, {"epoch": 1, "batches": 4}), (3, {"epoch": 0, "batches": 8})])
def test_sigterm_mid_step_checkpoints_at_the_step_boundary_exits_143_and_resumes_exactly(
        term_at, loader, uninterrupted_run, dropout_model_dir, tmp_path, capsys):  # fmt: skip
    runs = tmp_path / "runs"
    term = {"class_path": "_killer.TermMidStep", "init_args": {"step": term_at}}
    args = ["fit", "--config", write(tmp_path / "fit.yaml", config(dropout_model_dir, runs, [term]))]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == EXIT_CODE == 143  # a scheduler reads a preempted job as one
    err = capsys.readouterr().err
    ckpt = only_version(runs) / "checkpoints" / CHECKPOINT_NAME
    assert f"stopped by SIGTERM after optimizer step {term_at + 1}; checkpoint {ckpt}" in err
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    # The step in progress finished (both micro-batches), then the checkpoint: at a step boundary.
    assert state["global_step"] == term_at + 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [loader]
    assert not (only_version(runs) / "hf_model").exists()  # an unfinished run exports nothing

    (command,) = [line.removeprefix("resume with: ") for line in err.splitlines() if line.startswith("resume with: ")]
    python, dash_m, package, *resume_args = shlex.split(command)
    assert (python, dash_m, package) == (sys.executable, "-m", "bnll_lightning")
    assert resume_args == [*args, "--ckpt_path", "last"]
    main(resume_args)  # the printed command, run here (the signal callback fires at step 5 only)
    resumed_matches(runs, uninterrupted_run, term_at + 1)
    assert (only_version(runs) / "hf_model" / "config.json").is_file()
    assert not ckpt.exists()  # the completed run removed the checkpoint it resumed from


def test_sigterm_in_the_last_step_lets_the_run_finish(dropout_model_dir, tmp_path):
    runs = tmp_path / "runs"
    term = {"class_path": "_killer.TermMidStep", "init_args": {"step": 1}}
    cfg = write(tmp_path / "fit.yaml", config(dropout_model_dir, runs, [term]))
    main(["fit", "--config", cfg, "--trainer.max_steps", "2"])  # returns: no SystemExit
    assert (only_version(runs) / "hf_model" / "config.json").is_file()
    assert not (only_version(runs) / "checkpoints" / CHECKPOINT_NAME).exists()


def test_resume_command_replaces_the_checkpoint_argument():
    args = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=other", "--trainer.max_steps", "9"]
    by_last = resume_command(args, "runs/x/checkpoints/last-sigterm.ckpt", found_by_last=True)
    assert shlex.split(by_last)[3:] == ["fit", "--config", "a b.yaml", "--trainer.max_steps", "9", "--ckpt_path", "last"]
    # Without a ModelCheckpoint, Lightning's "last" does not look in that folder: the path itself.
    by_path = resume_command(args[:3], "/r/checkpoints/last-sigterm.ckpt", found_by_last=False)
    assert shlex.split(by_path)[3:] == ["fit", "--config", "a b.yaml", "--ckpt_path", "/r/checkpoints/last-sigterm.ckpt"]


@pytest.mark.slow  # a process of its own
def test_sigterm_sent_to_a_training_process_then_its_resume_command_matches_uninterrupted(
        uninterrupted_run, dropout_model_dir, tmp_path):  # fmt: skip
    runs = tmp_path / "runs"
    slow = {"class_path": "_killer.SlowSteps", "init_args": {"seconds": 0.5}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cfg = write(tmp_path / "fit.yaml", config(dropout_model_dir, runs, [slow]))
    proc = subprocess.Popen([sys.executable, "-m", "bnll_lightning", "fit", "--config", cfg], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/version_*/checkpoints/epoch=*.ckpt")):  # the run is training
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = torch.load(only_version(runs) / "checkpoints" / CHECKPOINT_NAME, weights_only=False)["global_step"]
    assert 3 <= stopped_at < STEPS
    (command,) = [line.removeprefix("resume with: ") for line in err.splitlines() if line.startswith("resume with: ")]
    python, dash_m, package, *resume_args = shlex.split(command)
    assert (python, dash_m, package, *resume_args) == (sys.executable, "-m", "bnll_lightning", "fit", "--config", cfg,
                                                        "--ckpt_path", "last")
    main(resume_args)  # here, as the reference ran: a process of its own rounds differently (~1e-5)
    resumed_matches(runs, uninterrupted_run, stopped_at)
