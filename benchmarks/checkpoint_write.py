"""Seconds and host memory to write one checkpoint: Lightning's TorchCheckpointIO, ours, and a plain torch.save.

The checkpoint is the embedded model's shape of one (weights + AdamW's two moments, float32: ~1.6 GB) made of
random tensors, so the figure is the write path's alone. The three alternate, each written ``--repeats`` times to
the same file (in the system temp dir unless ``--dir``), each write after ``os.sync()`` (as in a run, where
checkpoints are minutes apart and the last one's pages are on disk); the table gives the median and min-max seconds
and the peak of Python-allocated memory during the write (``tracemalloc``: the copy Lightning makes is Python's).

    python benchmarks/checkpoint_write.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bnll_lightning.checkpoint_io import DirectCheckpointIO


def checkpoint(params: int, tensors: int) -> dict:
    """A Lightning-shaped checkpoint: ``params`` float32 weights in ``tensors`` tensors, and two moments of each."""
    g = torch.Generator().manual_seed(0)
    size = params // tensors
    weights = {f"model.layer{i}.weight": torch.randn(size, generator=g) for i in range(tensors)}
    moments = {i: {"step": torch.tensor(16.0), "exp_avg": torch.randn(size, generator=g),
                   "exp_avg_sq": torch.rand(size, generator=g)} for i in range(tensors)}  # fmt: skip
    return {"state_dict": weights, "optimizer_states": [{"state": moments, "param_groups": []}], "global_step": 16}


def plain(state: dict, path: str) -> None:
    torch.save(state, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=134_515_008, help="weights (default: SmolLM2-135M's)")
    parser.add_argument("--tensors", type=int, default=272, help="tensors the weights are split into")
    parser.add_argument("--repeats", type=int, default=3, help="writes per side, alternating")
    parser.add_argument("--dir", help="folder to write to (default: the system temp dir)")
    args = parser.parse_args(argv)
    state = checkpoint(args.params, args.tensors)
    sides = {"Lightning TorchCheckpointIO": TorchCheckpointIO().save_checkpoint,
             "ours, DirectCheckpointIO": DirectCheckpointIO().save_checkpoint, "plain torch.save": plain}  # fmt: skip
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    peaks: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="bnll_ckpt_", dir=args.dir) as work:
        path = os.path.join(work, "last.ckpt")
        for r in range(args.repeats):
            for name in sides if r % 2 == 0 else reversed(list(sides)):
                os.sync()  # the previous write's dirty pages are not this one's cost
                tracemalloc.start()
                start = time.perf_counter()
                sides[name](state, path)
                seconds[name].append(time.perf_counter() - start)
                peaks[name].append(tracemalloc.get_traced_memory()[1] / 1e9)
                tracemalloc.stop()
        size = os.path.getsize(path) / 1e9
    rows = [{"side": k, "median": statistics.median(v), "min": min(v), "max": max(v), "peak_gb": max(peaks[k])}
            for k, v in seconds.items()]  # fmt: skip
    print(f"checkpoint {size:.2f} GB ({args.tensors} tensors x 3), {args.repeats} writes per side, alternating")
    print("| write path | seconds, median [min-max] | Python memory at peak (GB) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] | {r['peak_gb']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
