"""Shared fixtures: everything offline, tiny models built from a config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    from bnll_lightning.models import EMBEDDED, load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer (vocab 49 152), saved with save_pretrained."""
    from benchmarks._common import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64)


@pytest.fixture(scope="session")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout: every training step draws from the global generator."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("dropout_model") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.2
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="session")
def uninterrupted_run(dropout_model_dir, tmp_path_factory):
    """The TensorBoard scalars of the run tests/_resume_run.py describes, uninterrupted (resume and signal tests)."""
    from _resume_run import config, only_version, scalars, write
    from bnll_lightning.cli import main

    root = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", write(root / "fit.yaml", config(dropout_model_dir, root / "runs"))])
    return scalars(only_version(root / "runs"))
