"""Observation callbacks: p histograms per optimizer step, the custom-scalars layout, the defaults."""

import re

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from bnll_lightning.callbacks import (
    CONTINUUM_LAYOUT, ContinuumLayout, ProbabilityHistogram, StepLearningRateMonitor,
)
from bnll_lightning.export import HFExport
from bnll_lightning.signals import SignalCheckpoint


class Toy(L.LightningModule):
    """Stores, like SFTModule, the log p of the batch's "target tokens": here p = (batch_idx+1)/100 · [1, 2, 3]."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.last_target_logp = None

    def training_step(self, batch, batch_idx):
        self.last_target_logp = torch.log(torch.tensor([1.0, 2.0, 3.0]) * (batch_idx + 1) / 100)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=1)


def _fit(tmp_path, callbacks, logger=None, **kwargs):
    trainer = L.Trainer(
        max_steps=6, logger=logger if logger is not None else TensorBoardLogger(str(tmp_path), name="toy"),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, **kwargs,
    )  # fmt: skip
    trainer.fit(Toy())
    return trainer


def _events(trainer):
    ea = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_histogram_every_n_optimizer_steps_of_the_last_micro_batch(tmp_path):
    # Accumulating 2 micro-batches per optimizer step: 6 steps = 12 batches; a histogram every 2 steps.
    trainer = _fit(tmp_path, [ProbabilityHistogram(every_n_steps=2)], accumulate_grad_batches=2)
    histograms = _events(trainer).Histograms("train/p")
    assert [h.step for h in histograms] == [0, 2, 4]
    for h in histograms:
        # Optimizer step s ends with micro-batch 2s + 1, whose p are (2s + 2)/100 · [1, 2, 3].
        p = torch.tensor([1.0, 2.0, 3.0]) * (2 * h.step + 2) / 100
        v = h.histogram_value
        assert v.num == 3
        assert v.min == pytest.approx(p.min().item()) and v.max == pytest.approx(p.max().item())
        assert v.sum == pytest.approx(p.sum().item(), rel=1e-6)


def test_histogram_is_silent_without_tensorboard(tmp_path):
    trainer = _fit(tmp_path, [ProbabilityHistogram(every_n_steps=1)], logger=CSVLogger(str(tmp_path)))
    assert trainer.global_step == 6  # ran to the end, nothing raised
    with pytest.raises(ValueError):
        ProbabilityHistogram(every_n_steps=0)


def test_layout_puts_alpha_next_to_the_confidence(tmp_path):
    trainer = _fit(tmp_path, [ContinuumLayout()])
    layout = layout_pb2.Layout()
    layout.ParseFromString(_events(trainer).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert set(charts) == {"alpha vs confidence", "loss vs nll"}
    logged = ["train/alpha", "train/mean_p", "train/statistic_ema", "train/loss", "train/nll", "train/tokens",
              "train/mean_p_tail"]  # the last: a name the unanchored "train/mean_p" would also draw
    matched = {title: [t for t in logged if any(re.search(rx, t) for rx in rxs)] for title, rxs in charts.items()}
    # Each regex picks exactly its tag (they are matched anywhere in a name).
    assert matched == {"alpha vs confidence": ["train/alpha", "train/mean_p", "train/statistic_ema"],
                       "loss vs nll": ["train/loss", "train/nll"]}  # fmt: skip
    assert all(sum(bool(re.search(rx, t)) for t in logged) == 1 for c in charts.values() for rx in c)
    assert any(re.search(rx.strip("^$"), "train/mean_p_tail") for rx in charts["alpha vs confidence"])
    assert CONTINUUM_LAYOUT["continuum"]["alpha vs confidence"][0] == "Multiline"


def test_sft_module_adds_the_callbacks_by_default(tiny_model_dir, tmp_path):
    from bnll_lightning.module import SFTModule

    module = SFTModule(tiny_model_dir)
    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path)), callbacks=[LearningRateMonitor("epoch")])
    module.trainer = trainer
    kinds = {type(c): c for c in module.configure_callbacks()}
    # the configured LearningRateMonitor is kept
    assert set(kinds) == {HFExport, SignalCheckpoint, ContinuumLayout, ProbabilityHistogram}
    assert kinds[ProbabilityHistogram].every_n_steps == 50

    module = SFTModule(tiny_model_dir, histogram_every_n_steps=0)
    module.trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path)))
    callbacks = module.configure_callbacks()
    assert {type(c) for c in callbacks} == {HFExport, SignalCheckpoint, ContinuumLayout, StepLearningRateMonitor}
    assert callbacks[-1].logging_interval == "step"
    with pytest.raises(ValueError):
        SFTModule(tiny_model_dir, histogram_every_n_steps=-1)


class _Counts(L.Callback):
    """What the training bar shows after each micro-batch: (n, total)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, *args):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total))


def _fit_with_bar(tmp_path, max_steps, ckpt_path=None, **kwargs):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from bnll_lightning.callbacks import StepProgressBar

    counts = _Counts()
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, callbacks=[StepProgressBar(), counts, ModelCheckpoint(dirpath=tmp_path,
        save_last=True, every_n_train_steps=1)], enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip
    trainer.fit(Toy(), ckpt_path=ckpt_path)
    return counts.seen


def test_step_progress_bar_counts_optimizer_steps_across_accumulation_epochs_and_resume(tmp_path):
    # 12 batches per epoch, 2 micro-batches per step: 8 steps run into a second epoch.
    seen = _fit_with_bar(tmp_path, 8, accumulate_grad_batches=2)
    assert seen[-1] == (8, 8) and all(total == 8 for _, total in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)  # one bar for the whole run, never reset
    assert seen[1][0] == 1 and seen[0][0] == 0  # a step is counted when the optimizer has stepped
    resumed = _fit_with_bar(tmp_path / "more", 10, ckpt_path=str(tmp_path / "last.ckpt"), accumulate_grad_batches=2)
    assert resumed[0][1] == 10 and resumed[0][0] >= 8 and resumed[-1] == (10, 10)


def test_the_cli_uses_the_step_bar_unless_the_config_says_otherwise(tiny_model_dir):
    from bnll_lightning.callbacks import StepProgressBar
    from bnll_lightning.cli import SFTCLI, load_from_config

    cli = load_from_config(["--model.model", tiny_model_dir, "--trainer.max_steps", "2"], SFTCLI)
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)
    cli = load_from_config(["--model.model", tiny_model_dir, "--trainer.enable_progress_bar", "false"], SFTCLI)
    assert cli.trainer.progress_bar_callback is None


def _combine_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torchmetrics.aggregation import MeanMetric, SumMetric

    from bnll_lightning.callbacks import _all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 0: 3 of 4 right; rank 1: 1 of 2 right -> 4 of 6 over all rows. A rank without rows adds nothing.
        acc, n = [(0.75, 4), (0.5, 2)][rank]
        figures = [_all_ranks(MeanMetric(), torch.device("cpu"), acc, n), _all_ranks(SumMetric(), torch.device("cpu"), n),
                   _all_ranks(MeanMetric(), torch.device("cpu"), [0.9, 0.0][rank], [5, 0][rank])]
        if rank == 0:
            torch.save(figures, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # processes of their own: in `make test`, not in the fast loop
def test_generation_counts_combine_over_ranks_with_torchmetrics(tmp_path):
    """GenerationEval's figures over 2 gloo ranks: means weighted by each rank's rows, sums summed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "figures.pt")
    mp.spawn(_combine_on_two_ranks, args=(port, out), nprocs=2)
    accuracy, n, other = torch.load(out)
    assert accuracy == pytest.approx(4 / 6, abs=1e-12) and n == 6 and other == pytest.approx(0.9, abs=1e-12)


def test_accumulation_that_does_not_divide_the_epoch_is_said_once_and_the_lr_is_logged_once_a_step(
        tmp_path, tiny_model_dir):  # fmt: skip
    """8 batches an epoch, 3 micro-batches a step: steps of 3, 3, 2 micro-batches, said once with the count;
    before, nothing was said and the learning rate was logged at every micro-batch (3 points a step)."""
    from bnll_lightning.cli import main

    with pytest.warns(UserWarning) as warned:
        main(["fit", "--model.model", tiny_model_dir, "--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "3",
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--data.num_train", "16",
              "--data.num_val", "0", "--data.batch_size", "2", "--model.histogram_every_n_steps", "0"])
    said = [str(w.message) for w in warned if "does not divide" in str(w.message)]
    assert said == ["accumulate_grad_batches=3 does not divide the 8 training batches of an epoch: the last optimizer "
                    "step of each epoch accumulates 2 micro-batches instead of 3 (2 such step(s) in this run; the loss "
                    "stays token-exact, divided by that step's own target tokens)"]
    (log_dir,) = (tmp_path / "runs").glob("*/version_*")
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    lr_tags = [t for t in acc.Tags()["scalars"] if t.startswith("lr-")]  # one per parameter group
    assert lr_tags and all([e.step for e in acc.Scalars(t)] == list(range(6)) for t in lr_tags)  # once a step
    tokens = [e.value for e in acc.Scalars("train/tokens")]
    assert tokens[2] < min(tokens[0], tokens[1]) and tokens[5] < min(tokens[3], tokens[4])  # the short steps
