"""Shared fixtures: everything offline, tiny models built from a config."""

import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers on the two cores) one thread each, so they do not contend.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


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


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: its mode for a user, a read-only mount for root (whom modes do not stop)."""
    path = tmp_path / "read_only"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    elif _mount_tmpfs(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        pytest.skip("running as root without the right to mount a read-only filesystem")


@pytest.fixture
def full_dir(tmp_path):
    """A directory on a filesystem of 256 KiB: room for a config file, not for a model's weights."""
    path = tmp_path / "small_fs"
    if not _mount_tmpfs(path, "size=256k"):
        pytest.skip("no right to mount a small filesystem")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(autouse=True)
def _console_restored():
    """A test that builds the CLI without main() (load_from_config) leaves its quiet console on: undo it."""
    yield
    from bnll_lightning import console

    console.restore()
