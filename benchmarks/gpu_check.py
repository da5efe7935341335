"""The prepared GPU check: one script that runs every GPU-only path once and prints one table.

On a CUDA machine (≤ 10 minutes on one H100/H200), in this order:

1. a ``bf16-mixed`` fit of the embedded model (configs/demo.yaml, 20 steps), then the same with
   ``model.streaming.head_float32: true`` (the float32 head's cost is the difference);
2. FSDP2 and FSDP on one device, smoke runs (configs/demo.yaml + configs/fsdp2.yaml or fsdp.yaml, 5 steps);
3. 8-bit AdamW (configs/adamw8bit.yaml, bf16-mixed, 10 steps);
4. QLoRA on a 4-bit base (configs/qlora.yaml, 10 steps);
5. ``benchmarks/gpu_mfu.py`` at the 0.5B and 1.5B shapes (tokens/s, MFU, largest micro-batch);
6. peak memory of one step of log p, streamed vs full logits, vocabulary 151 936 × 8 192 tokens.

Each step runs in its own process with a time limit; a failure is recorded and the next one runs.
``--dry-run`` (what a machine without CUDA does) runs the same steps on a tiny model on CPU where
they can run there, and checks that the others' configs parse: the test suite runs it.

    python benchmarks/gpu_check.py --append             # on the GPU machine
    python benchmarks/gpu_check.py --dry-run            # anywhere: the harness
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def fit_args(out: str, name: str, *configs: str, steps: int, model: str | None, extra: list[str]) -> list[str]:
    args = [PY, "-m", "bnll_lightning", "fit"]
    for config in ("configs/demo.yaml", *configs):
        args += ["--config", config]
    args += ["--trainer.max_steps", str(steps), "--trainer.logger.init_args.save_dir", f"{out}/{name}",
             "--model.export_dir", f"{out}/{name}/export", "--trainer.val_check_interval", str(steps)]  # fmt: skip
    if model:
        args += ["--model.model", model]
    return args + extra


def checks(out: str, dry: bool, model: str | None) -> list[tuple[str, list[str] | None, int]]:
    """(name, command or None for the in-process memory check, time limit in seconds)."""
    gpu = [] if dry else ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    cpu = ["--trainer.accelerator", "cpu"] if dry else []
    parse = ["--print_config"]  # dry run of a CUDA-only path: the config must still parse
    mfu = [PY, "benchmarks/gpu_mfu.py"] + (["--quick", "--device", "cpu"] if dry else ["--append"])
    return [
        ("bf16-mixed fit, embedded model, 20 steps",
         fit_args(out, "bf16", steps=2 if dry else 20, model=model, extra=gpu + cpu + ["--trainer.precision", "bf16-mixed"]), 240),
        ("the same with model.streaming.head_float32: true (its cost: compare the wall times)",
         fit_args(out, "bf16_head32", steps=2 if dry else 20, model=model,
                  extra=gpu + cpu + ["--trainer.precision", "bf16-mixed", "--model.streaming.head_float32", "true"]), 240),
        ("FSDP2 on one device, 5 steps",
         fit_args(out, "fsdp2", "configs/fsdp2.yaml", steps=5, model=model,
                  extra=gpu + (parse if dry else ["--trainer.devices", "1"])), 180),
        ("FSDP on one device, 5 steps",
         fit_args(out, "fsdp", "configs/fsdp.yaml", steps=5, model=model, extra=gpu + (parse if dry else [])), 180),
        ("8-bit AdamW (bitsandbytes), bf16-mixed, 10 steps",
         fit_args(out, "adamw8bit", "configs/adamw8bit.yaml", steps=2 if dry else 10, model=model,
                  extra=gpu + cpu + (["--trainer.precision", "32-true"] if dry else ["--trainer.precision", "bf16-mixed"])), 180),
        ("QLoRA: LoRA on a 4-bit NF4 base, 10 steps",
         fit_args(out, "qlora", "configs/qlora.yaml", steps=10, model=model, extra=gpu + (parse if dry else [])), 180),
        ("gpu_mfu.py, Qwen2.5-0.5B shape", mfu + ["--size", "0.5b"], 300),
        ("gpu_mfu.py, Qwen2.5-1.5B shape", mfu + ["--size", "1.5b"], 300),
        ("peak memory of log p, streamed vs full logits, vocab 151 936 x 8 192 tokens", None, 120),
    ]  # fmt: skip


def logits_memory(device: str, vocab: int, tokens: int, hidden: int) -> str:
    """Peak memory of forward + backward of the targets' log p: streamed chunks vs full logits."""
    from bnll_lightning.objectives import token_logprobs
    from bnll_lightning.streaming import streamed_token_logprobs

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    peaks = {}
    for name in ("full logits", "streamed"):
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if name == "streamed":
            logp, mask = streamed_token_logprobs(h, w, labels, chunk_size=1024)
        else:
            logp, mask = token_logprobs(h @ w.T, labels)
        (-logp[mask].mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if device != "cuda":
        return f"ran on {device} at vocab {vocab} x {tokens} tokens (peak memory is measured on CUDA only)"
    return (f"full logits {peaks['full logits']:.2f} GiB, streamed {peaks['streamed']:.2f} GiB, ratio"
            f" {peaks['streamed'] / peaks['full logits']:.3f} (bf16, hidden {hidden}, chunk 1024)")  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: the harness (default without CUDA)")
    parser.add_argument("--out", default=None, help="where runs write logs and exports (default: a temporary directory)")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    threads = C.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bnll_gpu_check_") as work:
        out = args.out or work
        model = None
        if dry:

            model = C.make_tiny_model(f"{work}/tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        # A dry run's checks are tiny-model processes, mostly imports: two at a time. On a GPU one at a time,
        # so that no check shares the device with another (their seconds are read as costs).
        with ThreadPoolExecutor(max_workers=2 if dry else 1) as pool:
            rows = list(pool.map(lambda check: run_check(*check, dry=dry, env=env), checks(out, dry, model)))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    table = C.markdown_table(["check", "status", "result", "seconds"], rows)
    conditions = [f"device: {device}; {'dry run: tiny model on CPU, CUDA-only steps parse their config' if dry else 'full run'}",
                  "each check in its own process (a dry run: two at a time); configs/demo.yaml is the job config the overlays apply to"]  # fmt: skip
    args.quick = dry  # C.report marks a dry run as a harness check
    return C.report("GPU check: every GPU-only path once", "gpu_check.py", args, argv, threads, table, conditions)


def run_check(name: str, command: list[str] | None, limit: int, dry: bool, env: dict[str, str]) -> list[str]:
    """One check: its command in a process of its own (None: the in-process memory check); its table row."""
    start = time.perf_counter()
    if command is None:
        vocab, tokens = (151_936, 8_192) if not dry else (4_096, 256)
        try:
            status, detail = "ok", logits_memory("cuda" if not dry else "cpu", vocab, tokens, 896)
        except torch.OutOfMemoryError as err:
            status, detail = "failed", f"out of memory: {str(err).splitlines()[0]}"
    else:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            detail = _detail(tail, proc.returncode)
        except subprocess.TimeoutExpired:
            status, detail = "failed", f"over its {limit} s limit"
    seconds = time.perf_counter() - start
    print(f"[gpu_check] {name}: {status} ({seconds:.0f} s) {detail}", file=sys.stderr, flush=True)
    return [name, status, detail.replace("|", "/"), f"{seconds:.0f}"]


def _detail(lines: list[str], returncode: int) -> str:
    """The last line worth reading: an error on failure, else the last bnll or benchmark line."""
    if returncode:
        return next((line.strip() for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")[:200]
    keep = [line.strip() for line in lines if line.startswith(("[bnll]", "|")) and "---" not in line]
    return (keep[-1] if keep else "finished")[:200]


if __name__ == "__main__":
    main()
