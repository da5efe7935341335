"""The adaptive-α training path end to end: a tiny-model fit through the CLI with configs/demo.yaml +
configs/objectives/adaptive.yaml.

What TensorBoard shows must be what the controller did: replaying a fresh AdaptiveAlpha with the
logged statistic reproduces the logged α; a run resumed from a mid-way checkpoint continues the
same α trajectory (no jump, no second probe).
"""

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 8
# Thresholds that fit a tiny random model (mean p ~ 2e-5 at start, ~1e-2 after a few steps at lr 3e-2),
# so that α really moves and the probe starts it above 0.
CONTROLLER = {"alpha_max": 1.0, "low": 1e-5, "high": 0.05, "ema_decay": 0.5, "max_delta": 0.3, "statistic": "mean"}


def _fit(tiny_model_dir: str, root: Path, *extra: str) -> Path:
    ckpt = root / "ckpt"
    callbacks = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{ckpt}", "filename": "{{step}}", "every_n_train_steps": 4, "save_top_k": -1}}}}]'
    )
    args = [
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "adaptive.yaml"),
        "--model.model", tiny_model_dir,
        "--model.export_dir", str(root / "export"),
        "--model.histogram_every_n_steps", "2",
        "--model.warm_start_batches", "2",
        "--model.optimizer.init_args.lr", "3e-2",
        "--trainer.max_steps", str(STEPS),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        f"--trainer.callbacks={callbacks}",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--data.num_train", "16",
        "--data.num_val", "4",
        "--data.batch_size", "4",
    ]  # fmt: skip
    for key, value in CONTROLLER.items():
        args += [f"--model.alpha_controller.init_args.{key}", str(value)]
    main(args + list(extra))
    (run,) = (root / "runs").glob("*/version_*")
    return run


def _events(run: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _scalars(ea: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, _fit(tiny_model_dir, root)


def test_logged_alpha_follows_the_logged_mean_p(uninterrupted):
    _, run = uninterrupted
    ea = _events(run)
    alpha, mean_p, ema = (_scalars(ea, f"train/{t}") for t in ("alpha", "mean_p", "statistic_ema"))
    assert sorted(alpha) == sorted(mean_p) == sorted(ema) == list(range(STEPS))
    (probe,) = _scalars(ea, "warm_start/statistic").values()

    # Replay: the controller started at the probe, then fed each step's mean p.
    # train/alpha is the α the step's loss used; the step's mean p sets the α of the next step.
    replay = AdaptiveAlpha(**CONTROLLER)
    expected = replay.start(probe)
    assert expected > 0.0  # the probe, not 0 (NLL), is where α starts
    for step in range(STEPS):
        assert alpha[step] == pytest.approx(expected, abs=1e-5), step
        expected = replay.update(mean_p[step])
        assert ema[step] == pytest.approx(replay.ema, rel=1e-5), step
    values = [alpha[s] for s in range(STEPS)]
    assert max(values) - min(values) > 0.3  # α really moved, so the comparison means something
    assert mean_p[STEPS - 1] > 10 * mean_p[0]  # ...because the model grew confident


def test_fit_writes_histograms_layout_and_learning_rate(uninterrupted):
    _, run = uninterrupted
    ea = _events(run)
    histograms = ea.Histograms("train/p")
    assert [h.step for h in histograms] == list(range(0, STEPS, 2))
    for h in histograms:
        assert h.histogram_value.num > 0 and 0.0 <= h.histogram_value.min <= h.histogram_value.max <= 1.0
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["alpha vs confidence"] == ["^train/alpha$", "^train/mean_p$", "^train/statistic_ema$"]
    assert any(tag.startswith("lr-") for tag in ea.Tags()["scalars"])  # LearningRateMonitor, per step


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run checkpoints elsewhere, on purpose
def test_resume_continues_the_alpha_trajectory(uninterrupted, tiny_model_dir, tmp_path):
    root_a, run_a = uninterrupted
    ckpt = root_a / "ckpt" / "step=4.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["bnll"]["alpha_controller"]
    assert saved["step"] == 4 and saved["n_observed"] == 4

    run_b = _fit(tiny_model_dir, tmp_path, "--ckpt_path", str(ckpt))
    ea_a, ea_b = _events(run_a), _events(run_b)
    assert "warm_start/statistic" not in ea_b.Tags()["scalars"]  # a resumed run is not warm-started again
    alpha_a, alpha_b = _scalars(ea_a, "train/alpha"), _scalars(ea_b, "train/alpha")
    mean_p_b = _scalars(ea_b, "train/mean_p")
    assert sorted(alpha_b) == list(range(4, STEPS))

    # The resumed controller is exactly the checkpointed one: replaying from its state dict
    # with the resumed run's mean p gives the resumed run's α (a reset controller would restart at 0).
    replay = AdaptiveAlpha(**CONTROLLER)
    replay.load_state_dict(saved)
    for step in range(4, STEPS):
        assert alpha_b[step] == pytest.approx(replay.alpha, abs=1e-5), step  # α in force for the step
        replay.update(mean_p_b[step])

    # ...and the trajectory is the uninterrupted run's (same seed, same data order after resume).
    for step in range(4, STEPS):
        assert alpha_b[step] == pytest.approx(alpha_a[step], abs=1e-4), step
    final_a = torch.load(root_a / "ckpt" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    final_b = torch.load(tmp_path / "ckpt" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    state_a, state_b = final_a["bnll"]["alpha_controller"], final_b["bnll"]["alpha_controller"]
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        if isinstance(value, float):
            assert math.isclose(value, state_b[key], rel_tol=1e-4, abs_tol=1e-7), key
        else:
            assert value == state_b[key], key


def test_start_sets_the_state_like_initial():
    a, b = AdaptiveAlpha(initial=0.3), AdaptiveAlpha()
    assert b.start(0.3) == a.alpha
    assert b.state_dict()["ema_m"] == a.state_dict()["ema_m"] and b.ema == a.ema
    assert b.state_dict()["config"]["initial"] is None  # the start is state, not config
    assert [b.update(p) for p in (0.2, 0.6)] == [a.update(p) for p in (0.2, 0.6)]
    with pytest.raises(RuntimeError):
        b.start(0.5)  # only before the first update
    with pytest.raises(ValueError):
        AdaptiveAlpha().start(1.5)


def test_warm_start_batches_needs_an_adaptive_controller_without_initial(tiny_model_dir):
    from bnll_lightning.alpha import LinearAlpha
    from bnll_lightning.module import SFTModule
    from bnll_lightning.objectives import AlphaFamily

    with pytest.raises(ValueError, match="AdaptiveAlpha"):
        SFTModule(tiny_model_dir, objective=AlphaFamily(), alpha_controller=LinearAlpha(), warm_start_batches=2)
    with pytest.raises(ValueError, match="initial"):
        SFTModule(tiny_model_dir, objective=AlphaFamily(), alpha_controller=AdaptiveAlpha(initial=0.3), warm_start_batches=2)
