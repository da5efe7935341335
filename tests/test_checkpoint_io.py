"""DirectCheckpointIO: what Lightning's own saves, without the in-memory copy, atomically (fit uses it: test_cli)."""

import tracemalloc

import fsspec
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bnll_lightning.checkpoint_io import DirectCheckpointIO


def _state(n: int = 1000) -> dict:
    return {"state_dict": {"w": torch.arange(n, dtype=torch.float32)}, "optimizer_states": [{"step": 3}],
            "global_step": 7}  # fmt: skip


def test_saves_what_lightning_saves_and_leaves_no_partial_file(tmp_path):
    ours, theirs = tmp_path / "a" / "ours.ckpt", tmp_path / "theirs.ckpt"
    DirectCheckpointIO().save_checkpoint(_state(), ours)  # its folder made, as Lightning's
    TorchCheckpointIO().save_checkpoint(_state(), theirs)
    a, b = DirectCheckpointIO().load_checkpoint(ours), TorchCheckpointIO().load_checkpoint(theirs)
    assert torch.equal(a["state_dict"]["w"], b["state_dict"]["w"]) and a["global_step"] == b["global_step"] == 7
    assert [p.name for p in ours.parent.iterdir()] == ["ours.ckpt"]


def test_a_failed_write_keeps_the_earlier_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    io = DirectCheckpointIO()
    io.save_checkpoint(_state(), path)
    with pytest.raises(Exception):
        io.save_checkpoint({**_state(5), "unpicklable": lambda: None}, path)
    assert io.load_checkpoint(path)["state_dict"]["w"].numel() == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_no_copy_of_the_checkpoint_in_memory(tmp_path):
    state = _state(8_000_000)  # 32 MB of tensor data

    def peak(io):
        tracemalloc.start()
        io.save_checkpoint(state, tmp_path / f"{type(io).__name__}.ckpt")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(TorchCheckpointIO()) > 32e6  # Lightning's: the whole checkpoint in a buffer first
    assert peak(DirectCheckpointIO()) < 4e6


def test_remote_paths_are_saved_lightnings_way():
    url = "memory://bnll-test/ckpt/last.ckpt"
    DirectCheckpointIO().save_checkpoint(_state(), url)
    with fsspec.open(url, "rb") as f:
        assert torch.load(f, weights_only=True)["global_step"] == 7

