"""Forward + backward of the target tokens' log p three ways: full logits, the hand-written streamed
backward, and ``torch.utils.checkpoint`` per chunk: time and peak memory at a few (tokens, hidden, vocab).

- **full logits**: ``F.linear`` then ``F.cross_entropy(reduction="none")`` on float32 logits (autograd keeps
  ``[N, V]`` logits and their float32 copy).
- **streamed (hand-written)**: ``streaming.streamed_token_logprobs``, the package's path: a custom
  autograd function saves the inputs and the log-sum-exps, and its backward recomputes each chunk's
  logits and writes the hidden, weight and bias gradients itself.
- **checkpoint per chunk**: each chunk's logits -> log p under ``torch.utils.checkpoint`` (non-reentrant),
  as TRL's chunked NLL does: forward keeps only each chunk's inputs, backward recomputes the chunk and lets
  autograd differentiate it.

All three give the same float32 log p and gradients (``tests/test_streaming_backward.py``). The loss is
``sum(logp * u)`` with a fixed random ``u``, so no gradient is 0 (the streamed backward skips rows whose
gradient is exactly 0; here it skips none).

Time: median of ``--repeats`` forward + backward passes after one warm-up (CUDA synchronised). Memory on
CUDA: ``torch.cuda.max_memory_allocated`` over the allocation before the pass (inputs and weights). On
CPU: the growth of the process's resident set during the pass (``VmHWM`` reset through
``/proc/self/clear_refs``, minus ``VmRSS`` before), with glibc told to give every block of 64 KiB or more
back to the OS when freed, so the resident set follows live tensors (as ``benchmarks/memory.py`` does).

    python benchmarks/streaming_backward.py [--quick] [--append] [--shapes 8192,576,49152 ...]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from benchmarks import _common as C
from bnll_lightning.streaming import head_logits, streamed_token_logprobs

# (target tokens, hidden, vocab): SmolLM2-135M (the embedded model) at two batch sizes, then Qwen2.5-0.5B.
SHAPES = ((2048, 576, 49152), (8192, 576, 49152), (8192, 896, 151936))
QUICK_SHAPES = ((256, 64, 49152), (512, 32, 4096))
MIB = 2**20


def _chunk_logp(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    z = head_logits(hidden, weight, bias)
    return z.gather(1, targets[:, None])[:, 0] - torch.logsumexp(z, dim=-1)


def checkpointed_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024, bias: Tensor | None = None
) -> Tensor:
    """Float32 log p ``[N]`` of ``targets`` from ``hidden`` ``[N, H]``: each chunk's logits -> log p under
    ``torch.utils.checkpoint``, so backward recomputes the chunk and autograd differentiates it."""
    return torch.cat([
        checkpoint(_chunk_logp, hidden[i : i + chunk_size], weight, bias, targets[i : i + chunk_size],
                   use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk_size)
    ])  # fmt: skip


def methods(chunk_size: int) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """name -> (hidden [N, H], weight [V, H], targets [N]) -> float32 log p [N]."""

    def full(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
        return -F.cross_entropy(F.linear(h, w).float(), t, reduction="none")

    def streamed(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
        return streamed_token_logprobs(h[None], w, t[None], chunk_size=chunk_size)[0][0]

    def checkpointed(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
        return checkpointed_token_logprobs(h, w, t, chunk_size)

    return {"full logits + F.cross_entropy": full, "streamed (hand-written backward)": streamed,
            "checkpoint per chunk": checkpointed}  # fmt: skip


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _cpu_peak_start() -> int:
    """Give freed blocks >= 64 KiB back to the OS, reset the resident peak; the resident set now (KiB)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return _rss_kib("VmRSS")


def measure(fn: Callable, n: int, hidden: int, vocab: int, device: str, dtype: torch.dtype,
            repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes) of forward + backward of ``sum(fn(h, w, t) * u)``."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    u = torch.rand(n, generator=g).to(device)
    cuda = device == "cuda"

    def step() -> None:
        h.grad = w.grad = None
        (fn(h, w, t) * u).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    h.grad = w.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _cpu_peak_start() * 1024
    step()
    peak = torch.cuda.max_memory_allocated() - base if cuda else _rss_kib("VmHWM") * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return C.median(times), peak


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--shapes", nargs="+", default=None, help="tokens,hidden,vocab triples")
    parser.add_argument("--chunk-size", type=int, default=1024, help="target tokens per chunk (both chunked paths)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method and shape (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="hidden states and weight (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    threads = C.set_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.quick:
        shapes = shapes if args.shapes else QUICK_SHAPES
        args.repeats, args.chunk_size = 1, 128
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    load0 = C.load_average()
    rows = []
    for n, hidden, vocab in shapes:
        results = {name: measure(fn, n, hidden, vocab, args.device, dtype, args.repeats)
                   for name, fn in methods(args.chunk_size).items()}  # fmt: skip
        full_time, full_peak = results["full logits + F.cross_entropy"]
        for name, (seconds, peak) in results.items():
            rows.append([f"{n} x {hidden} x {vocab}", name, C.fmt(seconds, 4), C.fmt(peak / MIB, 1),
                         C.fmt(seconds / full_time), C.fmt(peak / full_peak) if full_peak > 0 else "n/a"])  # fmt: skip
    table = C.markdown_table(["tokens x hidden x vocab", "log p", "forward + backward (s, median)",
                              "peak memory (MiB)", "time / full", "memory / full"], rows)  # fmt: skip
    memory = ("torch.cuda.max_memory_allocated over the inputs" if args.device == "cuda" else
              "growth of the resident set (VmHWM after clear_refs - VmRSS before; mmap threshold 64 KiB)")
    conditions = [
        f"device {args.device}, hidden and weight {str(dtype).removeprefix('torch.')}, log p float32;"
        f" chunk_size {args.chunk_size};"
        f" median of {args.repeats} passes after one warm-up; loss sum(logp * u), u ~ U(0, 1)",
        f"memory: {memory}, during one pass (gradients of hidden and weight included)",
    ]
    return C.report("Streamed backward: hand-written vs checkpoint per chunk vs full logits", "streaming_backward.py",
                    args, argv, threads, table, conditions, load=(load0, C.load_average()))


if __name__ == "__main__":
    main()
