"""probe: the capability diagnosis of a model on the training data, without training."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from bnll_lightning import probe
from bnll_lightning.cli import load_from_config, main as cli_main, probe_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = [str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "objectives" / "adaptive.yaml")]
KEYS = {
    "model", "data", "split", "checkpoint", "batches", "rows", "tokens", "mean_p", "geometric_mean_p", "median_p",
    "quantiles", "tau", "fraction_below_tau", "nll", "token_accuracy", "thresholds", "zone", "zone_geometric",
    "caution", "recommended", "recommended_yaml", "adaptive_yaml", "generation",
}  # fmt: skip


def test_zone_at_its_thresholds():
    assert probe.zone(0.5) == "model-strong" and probe.zone(0.9) == "model-strong"
    assert probe.zone(math.nextafter(0.5, 0)) == "model-intermediate"
    assert probe.zone(0.1) == "model-intermediate"
    assert probe.zone(math.nextafter(0.1, 0)) == "model-weak" and probe.zone(0.0) == "model-weak"
    assert (probe.STRONG, probe.WEAK) == (0.5, 0.1)  # the paper's "prior-leaning above 0.5, NLL below 0.1"


def test_summarize_figures_and_advice():
    p = torch.tensor([0.01, 0.5, 0.9, 0.99])
    f = probe.summarize(p.log(), torch.tensor([False, True, True, True]))
    assert f["tokens"] == 4
    assert f["mean_p"] == pytest.approx(0.6)
    assert f["geometric_mean_p"] == pytest.approx((0.01 * 0.5 * 0.9 * 0.99) ** 0.25, rel=1e-6)
    assert f["median_p"] == pytest.approx(0.7)
    assert f["quantiles"]["0.25"] == pytest.approx(0.3775)  # linear interpolation between 0.01 and 0.5
    assert f["fraction_below_tau"] == 0.25 and f["token_accuracy"] == 0.75
    assert f["nll"] == pytest.approx(-p.log().double().mean().item())
    assert f["zone"] == "model-strong" and f["zone_geometric"] == "model-intermediate"
    advice = probe.recommend(f)
    assert advice["caution"] and "adaptive controller decide" in advice["caution"]  # the mean is not to be trusted

    consistent = probe.summarize(torch.full((8,), 0.8).log())
    advice = probe.recommend(consistent)
    assert advice["caution"] is None and "AdaptiveAlpha" in advice["adaptive_yaml"]
    assert yaml.safe_load(advice["recommended_yaml"])["model"]["objective"]["init_args"]["alpha"] == 1.0
    weak = probe.recommend(probe.summarize(torch.full((8,), 0.05).log()))
    assert yaml.safe_load(weak["recommended_yaml"])["model"]["objective"]["class_path"].endswith(".NLL")


def test_the_report_gives_the_noisy_label_recipe_at_the_strong_end_only():
    def report(p):
        figures = probe.summarize(torch.full((8,), p).log())
        return probe.format_report({"model": "m", "data": "d", "split": "train", "rows": 8, "batches": 1, "tokens": 8,
                                    **figures, **probe.recommend(figures)})  # fmt: skip

    strong, weak = report(0.8), report(0.05)
    assert "keep -p's best checkpoint by validation" in strong and "monitor:\n      val/mean_p, mode: max" in strong
    assert "best checkpoint" not in weak and "recommended objective: NLL" in weak
    # Both zones name the validation-aware overlay, and it is a shipped file with that controller.
    overlay = re.search(r"--config (\S+plateau\.yaml)", strong).group(1)
    assert overlay in weak and "PlateauAlpha" in (CONFIGS.parent / overlay).read_text()


def test_sample_is_seeded_disjoint_across_ranks_and_leaves_the_training_order_alone():
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.arange(20)), batch_size=3, shuffle=True, generator=generator)
    state = generator.get_state()
    ranks = [[int(x) for (b,) in probe.sample_batches(loader, 2, rank=r, world_size=2) for x in b] for r in (0, 1)]
    assert all(len(r) == 6 for r in ranks) and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == [int(x) for (b,) in probe.sample_batches(loader, 2, rank=0, world_size=2) for x in b]
    assert torch.equal(generator.get_state(), state)
    assert sum(len(b) for (b,) in probe.sample_batches(loader, 0)) == 20  # 0: all rows


@pytest.fixture(scope="module")
def trained_and_files(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short NLL fit on builtin:sort, and a file of random-letter rows."""
    root = tmp_path_factory.mktemp("probe")
    checkpoint = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        f'"init_args": {{"dirpath": "{root / "ckpt"}", "every_n_train_steps": 12}}}}]'
    )
    cli_main([
        "fit", "--config", *CONFIG, "--model.model", tiny_model_dir, "--model.export_dir", str(root / "trained"),
        "--model.objective", "bnll_lightning.objectives.NLL", "--model.alpha_controller", "null",
        "--model.warm_start_batches", "0", "--model.optimizer.init_args.lr", "3e-2", "--trainer.max_steps", "12",
        "--trainer.limit_val_batches", "0", f"--trainer.callbacks={checkpoint}",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--data.num_train", "32", "--data.num_val", "4", "--data.batch_size", "8",
    ])  # fmt: skip
    rng = random.Random(0)
    words = lambda n: " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5)) for _ in range(n))  # noqa: E731
    noise = root / "random.jsonl"
    noise.write_text("".join(json.dumps({"prompt": words(3), "response": words(6)}) + "\n" for _ in range(32)))
    return str(root / "trained"), str(noise), root


def _probe(model, root, name, *extra):
    output = root / f"{name}.json"
    probe_main(["--config", *CONFIG, "--model.model", model, "--data.num_train", "32", "--data.num_val", "4",
                "--max_batches", "3", "--output", str(output), *extra])  # fmt: skip
    return json.loads(output.read_text())


def test_probe_tells_predictable_from_random_data(trained_and_files, capsys):
    model, noise, root = trained_and_files
    # --generate also answers 2 val rows by generation (built-in task checker); file rows have none.
    learned = _probe(model, root, "learned", "--generate", "2", "--max_new_tokens", "4")
    report = capsys.readouterr().out
    random_rows = _probe(model, root, "random", "--data.train", noise, "--generate", "2")
    assert set(learned) == set(random_rows) == KEYS
    assert learned["data"] == "builtin:sort" and random_rows["data"] == noise
    assert learned["batches"] == random_rows["batches"] == 3 and learned["rows"] == 24
    # Measured after 12 steps: mean p 0.099 vs 0.0027, geometric mean 0.088 vs 1.5e-6.
    assert learned["mean_p"] > 10 * random_rows["mean_p"]
    assert learned["geometric_mean_p"] > 1000 * random_rows["geometric_mean_p"]
    assert learned["thresholds"] == {"strong": 0.5, "weak": 0.1}
    generation = learned["generation"]
    assert generation["rows"] == 2 and generation["checker"] == "task" and 0 <= generation["correct"] <= 2
    assert random_rows["generation"] is None
    assert random_rows["zone"] == "model-weak" and random_rows["recommended"] == "NLL"
    for figure in ("mean p", "geometric mean p", "median p", "10%", "90%", "model-strong >= 0.5",
                   "the arithmetic mean can mislead", "base accuracy by generation"):  # fmt: skip
        assert figure in report, figure


def test_probe_of_a_checkpoint_measures_its_weights(trained_and_files, tiny_model_dir):
    _, _, root = trained_and_files
    (ckpt,) = (root / "ckpt").glob("*.ckpt")  # saved after the last step: the trained model
    report = _probe(tiny_model_dir, root, "ckpt", "--ckpt_path", str(ckpt))
    learned = json.loads((root / "learned.json").read_text())
    assert report["checkpoint"] == str(ckpt)
    assert report["mean_p"] == pytest.approx(learned["mean_p"], rel=1e-5)  # not the random base model's


def test_probe_snippets_are_ready_to_paste(trained_and_files, tiny_model_dir):
    _, _, root = trained_and_files
    report = json.loads((root / "learned.json").read_text())
    snippet = root / "adaptive_snippet.yaml"
    snippet.write_text(report["adaptive_yaml"])
    cli = load_from_config(["--config", *CONFIG, "--config", str(snippet), "--model.model", tiny_model_dir])
    controller = cli.model.alpha_controller
    assert type(controller).__name__ == "AdaptiveAlpha" and cli.model.warm_start_batches == 0  # no warm start
    assert (controller.statistic, controller.quantile, controller.low, controller.high) == ("quantile", 0.5, 0.9, 0.99)
