"""PlateauAlpha in a real fit: the validations it is fed, the fallback without validation, and resume."""

import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning.alpha import PlateauAlpha
from bnll_lightning.cli import main
from bnll_lightning.plateau import planned_validations

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 8


def _fit(tiny_model_dir: str, root: Path, *extra: str, after_validation: bool = True) -> Path:
    ckpt = root / "ckpt"
    # After each validation (a monitored ModelCheckpoint), or at every 4th training batch, before its validation.
    when = '"monitor": "val/nll"' if after_validation else '"every_n_train_steps": 4'
    callbacks = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{ckpt}", "filename": "{{step}}", {when}, "save_top_k": -1}}}}]'
    )
    args = [
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "plateau.yaml"),
        "--model.model", tiny_model_dir,
        "--model.export_dir", str(root / "export"),
        "--model.histogram_every_n_steps", "0",
        "--model.optimizer.init_args.lr", "3e-2",
        # Nothing counts as an improvement after the first validation: α rises at the second (step 4).
        "--model.alpha_controller.init_args.min_delta", "100",
        # The first design (the shipped config is the second: RESTORE and the tests of the shipped config).
        "--model.alpha_controller.init_args.monitor", "val/nll",
        "--model.alpha_controller.init_args.mode", "min",
        "--model.alpha_controller.init_args.restore_best", "false",
        "--model.alpha_controller.init_args.before_rise", "nll",
        "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        f"--trainer.callbacks={callbacks}",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--data.num_train", "16",
        "--data.num_val", "4",
        "--data.batch_size", "4",
    ]  # fmt: skip
    main(args + list(extra))
    (run,) = (root / "runs").glob("*/version_*")
    return run


def _scalars(run: Path, tag: str) -> dict[int, float]:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags()["scalars"] else {}


def _controller(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["bnll"]["alpha_controller"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plateau")
    return root, _fit(tiny_model_dir, root)


def test_alpha_rises_after_the_validation_that_misses(uninterrupted):
    root, run = uninterrupted
    level = _scalars(run, "val/alpha_level")
    assert sorted(level) == [2, 4, 6, 8]  # one per validation, none from a sanity check
    assert level[2] == 0.0 and level[4] == 1.0
    alpha = _scalars(run, "train/alpha")
    # train/alpha is the α a step trained with: the 5th step (index 4) still used 0, then the ramp.
    assert [alpha[s] for s in range(STEPS)] == pytest.approx([0, 0, 0, 0, 0, 0.25, 0.5, 0.75])
    state = _controller(root / "ckpt" / f"step={STEPS}.ckpt")
    assert state["run_mode"] == "validation" and state["rises"] == [4] and state["validations"] == 4


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_continues_the_same_trajectory(uninterrupted, tiny_model_dir, tmp_path):
    root_a, run_a = uninterrupted
    saved = _controller(root_a / "ckpt" / "step=4.ckpt")
    assert saved["step"] == 4
    run_b = _fit(tiny_model_dir, tmp_path, "--ckpt_path", str(root_a / "ckpt" / "step=4.ckpt"))
    alpha_a, alpha_b = _scalars(run_a, "train/alpha"), _scalars(run_b, "train/alpha")
    assert sorted(alpha_b) == list(range(4, STEPS))
    for step in range(4, STEPS):
        assert alpha_b[step] == pytest.approx(alpha_a[step], abs=1e-6), step
    state_a = _controller(root_a / "ckpt" / f"step={STEPS}.ckpt")
    state_b = _controller(tmp_path / "ckpt" / f"step={STEPS}.ckpt")
    for key, value in state_a.items():
        if isinstance(value, float):
            assert math.isclose(value, state_b[key], rel_tol=1e-4, abs_tol=1e-6), key
        else:
            assert value == state_b[key], key


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_from_before_a_validation_says_the_controller_missed_it(uninterrupted, tiny_model_dir, tmp_path):
    root_a, _ = uninterrupted
    early = tmp_path / "early"
    _fit(tiny_model_dir, early, after_validation=False)
    assert _controller(early / "ckpt" / "step=4.ckpt")["validations"] == 1  # written before step 4's validation
    with pytest.warns(UserWarning, match="seen 1 of 2 validations"):
        _fit(tiny_model_dir, tmp_path / "resumed", "--ckpt_path", str(early / "ckpt" / "step=4.ckpt"),
             after_validation=False)  # fmt: skip


RESTORE = ("--model.alpha_controller.init_args.restore_best", "true")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def restored(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("restore")
    return root, _fit(tiny_model_dir, root, *RESTORE)


def test_restore_best_takes_the_weights_back_to_the_best_validation_at_the_rise(restored):
    root, _ = restored
    ckpt = root / "ckpt"
    state = _controller(ckpt / f"step={STEPS}.ckpt")
    assert state["rises"] == [4] and state["restored"] == [4]
    # The checkpoint written after step 4's validation holds step 2's weights (the only best so far), then
    # training goes on from them: the steps after differ.
    at_rise, best, later = _weights(ckpt / "step=4.ckpt"), _weights(ckpt / "step=2.ckpt"), _weights(ckpt / "step=6.ckpt")
    assert at_rise.keys() == best.keys()
    assert all(torch.equal(at_rise[k], best[k]) for k in best)
    assert any(not torch.equal(later[k], best[k]) for k in best)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_restore_best_resumes_exactly_from_before_the_rise(restored, tiny_model_dir, tmp_path):
    root_a, _ = restored
    _fit(tiny_model_dir, tmp_path, *RESTORE, "--ckpt_path", str(root_a / "ckpt" / "step=2.ckpt"))
    a, b = _weights(root_a / "ckpt" / f"step={STEPS}.ckpt"), _weights(tmp_path / "ckpt" / f"step={STEPS}.ckpt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert _controller(tmp_path / "ckpt" / f"step={STEPS}.ckpt")["restored"] == [4]


def test_restore_best_without_a_checkpoint_of_its_monitor_says_what_to_add(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _fit(tiny_model_dir, tmp_path, *RESTORE, "--model.alpha_controller.init_args.monitor", "val/mean_p",
             "--model.alpha_controller.init_args.mode", "max")  # fmt: skip
    assert exit_info.value.code == 2
    assert "needs a ModelCheckpoint with monitor='val/mean_p', mode='max'" in capsys.readouterr().err


def test_without_validation_it_runs_as_adaptive_alpha_and_warns(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="validates 0 time"):
        run = _fit(tiny_model_dir, tmp_path, "--trainer.limit_val_batches", "0", after_validation=False)
    assert _controller(tmp_path / "ckpt" / f"step={STEPS}.ckpt")["run_mode"] == "fallback"
    assert not _scalars(run, "val/alpha_level")


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Count(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.planned = planned_validations(trainer)
        self.seen = 0

    def on_validation_end(self, trainer, pl_module):
        self.seen += not trainer.sanity_checking


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_epochs=3),  # once per epoch
        dict(max_steps=10, val_check_interval=3, check_val_every_n_epoch=None),  # across epochs
        dict(max_epochs=4, check_val_every_n_epoch=2),
        dict(max_epochs=2, val_check_interval=2),  # twice per epoch of 4 batches
        dict(max_epochs=2, limit_val_batches=0),
        dict(max_steps=6, val_check_interval=2),  # stops mid-epoch
    ],
)
def test_planned_validations_is_what_lightning_runs(settings, tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    count = _Count()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[count], default_root_dir=tmp_path, **settings)  # fmt: skip
    trainer.fit(_Tiny(), loader, loader)
    assert count.planned == count.seen


def test_plateau_alpha_is_fed_nothing_in_the_sanity_check(tmp_path):
    from bnll_lightning.plateau import PlateauFeed

    class Module(_Tiny):
        def __init__(self):
            super().__init__()
            self.alpha_controller = PlateauAlpha(monitor="val/nll", mode="min", restore_best=False)

        def validation_step(self, batch, batch_idx):
            self.log("val/nll", float(self.current_epoch))

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    module = Module()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1, callbacks=[PlateauFeed()],
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data, data)
    controller = module.alpha_controller
    assert controller.validations == 3 and controller.best == 0.0  # epochs 0, 1, 2: the rise is at epoch 1
    assert controller.level == 1.0 and controller.rises == [0]  # this module never steps the controller


def test_the_shipped_config_restores_from_the_checkpoint_it_adds(tiny_model_dir, tmp_path, capsys):
    # configs/objectives/plateau.yaml on demo.yaml, as a user runs it: its ModelCheckpoint on val/mean_p is appended
    # to the job's callbacks, and a rise (nothing improves by 100 after the first validation) restores from it.
    main([
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "plateau.yaml"),
        "--model.model", tiny_model_dir, "--model.export_dir", str(tmp_path / "export"),
        "--model.alpha_controller.init_args.min_delta", "100",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.num_train", "12", "--data.num_val", "4", "--data.batch_size", "2",
    ])  # fmt: skip
    (checkpoints,) = (tmp_path / "runs").glob("*/version_*/checkpoints")
    (best,) = checkpoints.glob("best-*.ckpt")  # the weights the rise restored, then (min_delta aside) later bests
    assert "optimizer_states" not in torch.load(best, weights_only=False)
    state = _controller(checkpoints / "last.ckpt")
    assert state["run_mode"] == "validation" and state["rises"] == [4] and state["restored"] == [4]
    # The disk report names the folder both checkpoint callbacks write to once.
    out = capsys.readouterr().out
    assert out.count(f"checkpoints  {checkpoints}") == 1 and "checkpoints 2" not in out
