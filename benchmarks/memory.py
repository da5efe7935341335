"""Peak memory of a training step, streamed log p / naive (full logits), and the longest sequence
that fits a fixed memory budget each way.

A training step is ``SFTModule.training_step`` (log p, objective, statistics) and ``backward``,
for NLL and for each objective that needs more than log p (entropies, ASFT's frozen reference),
the weight gradients included, on a small decoder body (SmolLM2's hidden size 576, 2 layers, its
49 152-token vocabulary) so the output head dominates as it does in real SFT at large vocabularies.
Every position is a target (no prompt), the case least favourable to the streamed path, which
projects only target positions.

How memory is measured (CPU): every configuration runs in a fresh Python process. After the
model and batch exist, the process's resident set (``VmRSS``) is the baseline and its peak
(``VmHWM``) is reset through ``/proc/self/clear_refs``; after the step, the step's peak memory is
``VmHWM - baseline``. glibc is told (``mallopt``) to serve every block of 64 KiB or more with its
own mmap, so freed tensors leave the resident set at once and it follows live memory. Where
``clear_refs`` is not writable the baseline is the process's earlier peak (``ru_maxrss``).

    python benchmarks/memory.py [--quick] [--append]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C

TARGET = 0.35  # streamed peak / naive peak at vocabulary 49 152, 4 x 1024 tokens
GIB = 2**30
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


# --------------------------------------------------------------------------- one measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _tune_malloc() -> None:
    """Blocks >= 64 KiB get their own mmap and go back to the OS when freed (no cached free heap)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def objectives() -> dict[str, object]:
    """Objective rows beyond NLL (name -> factory). ASFT's reference is the model itself, loaded
    again in float32: its weights are reported apart from the step's peak (they sit in the baseline)."""
    from bnll_lightning.objectives import ASFT, EAFT, TokenAlpha

    return {
        "EAFT (top-20 entropy)": lambda: EAFT(1.0, k=20),
        "TokenAlpha (entropy signal)": lambda: TokenAlpha(1.0, signal="entropy"),
        "ASFT (KL to a float32 reference)": lambda: ASFT(0.1),
    }


def build(model_dir: str, streamed: bool, chunk_size: int, objective: str | None = None):
    from bnll_lightning.logp_head import StreamingArgs
    from bnll_lightning.module import SFTModule

    made = None if objective is None else objectives()[objective]()
    with C.quiet():
        return SFTModule(model=model_dir, streaming=StreamingArgs(streamed, chunk_size), histogram_every_n_steps=0,
                         objective=made)


def measure(module, batch_size: int, seq_len: int) -> dict:
    """Peak bytes one forward+backward of ``module`` adds over the loaded model and batch, in this process."""
    _tune_malloc()
    vocab = module.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    module.zero_grad(set_to_none=True)
    gc.collect(1)  # the young generations: enough for a previous step's garbage, cheap in a big process
    _tune_malloc()
    if _reset_peak():
        method, baseline = "VmHWM after clear_refs", _status_kib("VmRSS")
    else:
        method, baseline = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = module.training_step(batch, 0)
    loss.backward()
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    del loss
    module.zero_grad(set_to_none=True)
    reference = module.objective.reference
    return {"delta": (peak - baseline) * 1024, "baseline": baseline * 1024, "method": method,
            "streamed": module.head.streamed, "attention": module.model.config._attn_implementation,
            "reference_bytes": 0 if reference is None else reference.num_bytes()}


def measure_isolated(
    model_dir: str, batch_size: int, seq_len: int, streamed: bool, chunk_size: int, threads: int,
    objective: str | None = None,
) -> dict:
    """:func:`measure` in a fresh Python process (no allocator state from earlier measurements)."""
    spec = json.dumps(dict(model_dir=model_dir, batch_size=batch_size, seq_len=seq_len, streamed=streamed,
                           chunk_size=chunk_size, objective=objective))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", spec, "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- search


def largest_fitting(fits, start: int, cap: int, granularity: int) -> tuple[int, bool, int]:
    """Largest length (a multiple of ``granularity``, <= ``cap``) with ``fits(length)`` true, assuming
    memory grows with length: doubling from ``start``, then bisection. Returns (length, capped, probes);
    length 0 when not even ``start`` fits; capped when ``cap`` itself fits."""
    probes, lo, hi, length = 0, 0, None, start
    while hi is None:
        probes += 1
        if fits(length):
            lo = length
            if length >= cap:
                return lo, True, probes
            length = min(length * 2, cap)
        else:
            hi = length
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        probes += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False, probes


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (hidden 576, SmolLM2's)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="SFTModule chunk_size (streamed path)")
    parser.add_argument("--budget-gib", type=float, default=1.0, help="memory budget of one step (GiB over the model)")
    parser.add_argument("--budget-batch-size", type=int, default=1, help="rows per step in the budget search")
    parser.add_argument("--max-seq-len", type=int, default=8192, help="search cap (SmolLM2's context length)")
    parser.add_argument("--granularity", type=int, default=256, help="sequence-length resolution of the search")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (less isolated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = C.set_threads(args.threads)
    if args.child:  # one measurement for the parent process
        spec = json.loads(args.child)
        module = build(spec["model_dir"], spec["streamed"], spec["chunk_size"], spec.get("objective"))
        print(json.dumps(measure(module, spec["batch_size"], spec["seq_len"])))
        return ""
    if args.quick:
        args.batch_size, args.seq_len, args.layers, args.chunk_size = 2, 128, 1, 64
        args.budget_gib, args.max_seq_len, args.granularity = 0.1, 256, 64
        args.in_process = True

    overrides = {"num_hidden_layers": args.layers}
    if args.quick:
        overrides = {**C.TINY, "num_hidden_layers": args.layers}
    load0 = C.load_average()
    with tempfile.TemporaryDirectory(prefix="bnll_mem_") as work:
        model_dir = f"{work}/model"
        with C.quiet():
            n_params = C.save_random_model(model_dir, **overrides)
            config = C.embedded_config(**overrides)

        modules = {}

        def one(batch_size: int, seq_len: int, streamed: bool, objective: str | None = None) -> dict:
            if args.in_process:
                if (streamed, objective) not in modules:
                    modules[streamed, objective] = build(model_dir, streamed, args.chunk_size, objective)
                return measure(modules[streamed, objective], batch_size, seq_len)
            return measure_isolated(model_dir, batch_size, seq_len, streamed, args.chunk_size, threads, objective)

        main_runs = {s: one(args.batch_size, args.seq_len, s) for s in (False, True)}
        objective_runs = {name: {s: one(args.batch_size, args.seq_len, s, name) for s in (False, True)}
                          for name in objectives()}
        if not main_runs[True]["streamed"]:
            raise RuntimeError("SFTModule fell back to full logits: the streamed path is off for this model")
        budget = args.budget_gib * GIB
        searches = {}
        for s in (False, True):
            searches[s] = largest_fitting(
                lambda n, s=s: one(args.budget_batch_size, n, s)["delta"] <= budget,
                start=args.granularity, cap=args.max_seq_len, granularity=args.granularity,
            )
    load1 = C.load_average()

    naive, streamed = main_runs[False]["delta"], main_runs[True]["delta"]
    ratio = streamed / naive
    rows = [
        [f"peak memory of a step, {args.batch_size} x {args.seq_len} tokens (GiB over the model)",
         C.fmt(naive / GIB), C.fmt(streamed / GIB), C.fmt(ratio),
         f"<= {TARGET}: " + ("yes" if ratio <= TARGET else "**no**")],
    ]
    longest = {}
    for s, (length, capped, _) in searches.items():
        longest[s] = f">= {length} (search cap)" if capped else (str(length) if length else f"< {args.granularity}")
    gain = searches[True][0] / searches[False][0] if searches[False][0] else float("nan")
    rows.append([f"longest sequence in {C.fmt(args.budget_gib, 2)} GiB, batch {args.budget_batch_size} (tokens)",
                 longest[False], longest[True], C.fmt(gain, 2) + (" (at least)" if searches[True][1] else ""), "-"])
    for name, runs in objective_runs.items():
        naive_o, streamed_o = runs[False]["delta"], runs[True]["delta"]
        rows.append([f"peak memory of a step, {name}, {args.batch_size} x {args.seq_len} tokens (GiB over the model)",
                     C.fmt(naive_o / GIB), C.fmt(streamed_o / GIB), C.fmt(streamed_o / naive_o), "-"])
        reference = runs[True]["reference_bytes"]
        if reference:  # the anchor's weights: in the baseline of the step, so shown on their own
            rows.append([f"{name}: the reference's weights (GiB, on top of the model)", C.fmt(reference / GIB),
                         C.fmt(reference / GIB), C.fmt(1.0), "-"])
    table = C.markdown_table(["measure", "naive (full logits)", "streamed", "streamed / naive", "target"], rows)
    isolation = "in this process (--quick/--in-process)" if args.in_process else "each in a fresh Python process"
    conditions = [
        f"model: SmolLM2 config (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocabulary"
        f" {config.vocab_size}, tied head), random init, {n_params / 1e6:.1f} M parameters, float32,"
        f" attention {main_runs[True]['attention']}",
        "step: SFTModule.training_step + backward (NLL unless the row names another objective, weight gradients"
        f" included, no optimizer state); every position a target; streamed chunk_size {args.chunk_size}",
        "objective rows: the step's peak over the loaded model(s) and batch; ASFT's reference (the same"
        " architecture, float32) adds its forward to the step and its weights, shown in their own row, to the model",
        f"memory: peak resident set of the step over the loaded model and batch ({main_runs[True]['method']}),"
        f" measured {isolation}; mallopt mmap threshold 64 KiB",
        f"budget search: doubling then bisection to {args.granularity} tokens, cap {args.max_seq_len};"
        f" {searches[False][2]} + {searches[True][2]} probes",
    ]
    return C.report(
        "Memory: streamed / naive log p", "memory.py", args, argv, threads, table, conditions,
        load=(load0, load1),
    )


if __name__ == "__main__":
    main()
