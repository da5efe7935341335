"""GPU tokens/s and model FLOPs utilisation (MFU) of a 0.5B or 1.5B Qwen2-shaped model, naive
(full logits) against streamed log p, and the largest micro-batch that fits each way.

The model is built from a Qwen2.5-0.5B / 1.5B-shaped ``Qwen2Config`` written below (random init,
nothing downloaded; the embedded SmolLM2 tokenizer is saved next to it only because ``SFTModule``
loads one: the batches are random token ids). A step is ``SFTModule.training_step`` under bf16
autocast (float32 weights, like Lightning's ``bf16-mixed``), ``backward`` and the module's default
AdamW (fused). First the largest micro-batch that fits is searched each way (doubling, then
bisection; a probe is one full step), then tokens/s is timed at the naive path's largest
micro-batch on both paths (same work) and at the streamed path's own largest (when larger).

MFU = model FLOPs per token x tokens/s / the GPU's peak dense bf16 FLOP/s, with model FLOPs per
token = 6 x (matmul parameters, the output head once) + 12 x layers x attention width x sequence
length (the PaLM convention, attention counted without the causal half; the streamed path's
recomputed head is not counted: it is not model work).

CUDA only: without a CUDA device the script exits with a message (``--device cpu`` runs the same
harness on the CPU, for its tests, and reports no MFU).

    python benchmarks/gpu_mfu.py [--size 0.5b|1.5b] [--seq-len 2048] [--append]
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C

# Qwen2.5 shapes (the published configs); tie_word_embeddings as in both releases.
SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}
# Peak dense bf16 tensor FLOP/s by device-name substring, most specific first (vendor data sheets).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12)]


def qwen2_config(size: str):
    from transformers import Qwen2Config

    shape = {"vocab_size": 151936, **SIZES[size]}
    return Qwen2Config(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_cache=False, **shape)


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: every 2-D weight except an untied input embedding."""
    n = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        n -= embedding.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's convention (see the module docstring)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_width = cfg.num_attention_heads * head_dim
    return 6.0 * matmul_params(model) + 12.0 * cfg.num_hidden_layers * attention_width * seq_len


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


# --------------------------------------------------------------------------- one path


class Runner:
    """One SFTModule (naive or streamed) on the device with its optimizer, stepping on random batches."""

    def __init__(self, model_dir: str, streamed: bool, chunk_size: int, device: torch.device, seq_len: int):
        from bnll_lightning.logp_head import StreamingArgs
        from bnll_lightning.module import SFTModule
        from bnll_lightning.optim import default_optimizer

        with C.quiet():
            self.module = SFTModule(model=model_dir, streaming=StreamingArgs(streamed, chunk_size),
                                    histogram_every_n_steps=0).to(device)
        self.optimizer = default_optimizer([p for p in self.module.model.parameters() if p.requires_grad])
        self.device, self.seq_len, self.vocab = device, seq_len, self.module.model.config.vocab_size
        self.streamed = self.module.head.streamed
        self.generator = torch.Generator(device="cpu").manual_seed(0)

    def batch(self, micro_batch: int) -> dict:
        ids = torch.randint(0, self.vocab, (micro_batch, self.seq_len), generator=self.generator).to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(self, batch: dict) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss_sum = self.module.training_step(batch, 0)
        (loss_sum / batch["labels"].numel()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fits(self, micro_batch: int) -> bool:
        """One full step at this micro-batch; False on CUDA out-of-memory."""
        ok = True
        try:
            self.step(self.batch(micro_batch))
        except torch.cuda.OutOfMemoryError:
            ok = False
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return ok

    def largest_micro_batch(self, cap: int) -> tuple[int, bool]:
        """(largest micro-batch <= cap that completes a step, whether the cap was reached)."""
        lo, hi, b = 0, None, 1
        while hi is None:
            if self.fits(b):
                lo = b
                if b >= cap:
                    return lo, True
                b = min(2 * b, cap)
            else:
                hi = b
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(mid) else (lo, mid)
        return lo, False

    def throughput(self, micro_batch: int, warmup: int, steps: int) -> tuple[float, float]:
        """(tokens/s, peak memory GiB) over ``steps`` timed steps after ``warmup``; nan on OOM."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        batches = [self.batch(micro_batch) for _ in range(warmup + steps)]
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for b in batches[:warmup]:
                self.step(b)
            sync()
            start = time.perf_counter()
            for b in batches[warmup:]:
                self.step(b)
            sync()
            elapsed = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, math.nan
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else math.nan
        return micro_batch * self.seq_len * steps / elapsed, peak

    def close(self) -> None:
        del self.module, self.optimizer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--size", choices=["0.5b", "1.5b"], default="0.5b", help="Qwen2.5-shaped model size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=1024, help="SFTModule chunk_size (streamed path)")
    parser.add_argument("--max-micro-batch", type=int, default=256, help="cap of the micro-batch search")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per throughput measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s "
                        "(default: from the device name; unknown devices get no MFU)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (harness check only)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py measures GPU throughput and needs a CUDA device; none is available here"
                         " (torch.cuda.is_available() is False). Nothing was measured.")
    size = args.size
    if args.quick:
        size, args.seq_len, args.chunk_size, args.max_micro_batch, args.steps, args.warmup = "tiny", 64, 32, 2, 2, 1
    threads = C.set_threads(args.threads)

    load0 = C.load_average()
    with tempfile.TemporaryDirectory(prefix="bnll_gpu_") as work:
        from transformers import AutoModelForCausalLM

        from bnll_lightning.models import EMBEDDED, load_tokenizer

        with C.quiet():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(qwen2_config(size), dtype=torch.float32)
            n_params, fpt = sum(p.numel() for p in model.parameters()), flops_per_token(model, args.seq_len)
            model.save_pretrained(f"{work}/model")
            load_tokenizer(EMBEDDED).save_pretrained(f"{work}/model")
            del model
        peak = peak_flops(device, args.peak_tflops)
        largest, results = {}, []
        for streamed in (False, True):  # naive first: its largest micro-batch is the common one
            runner = Runner(f"{work}/model", streamed, args.chunk_size, device, args.seq_len)
            if streamed and not runner.streamed:
                raise RuntimeError("SFTModule fell back to full logits: the streamed path is off for this model")
            largest[streamed] = runner.largest_micro_batch(args.max_micro_batch)
            if largest[False][0] == 0:
                raise SystemExit(f"not even micro-batch 1 x {args.seq_len} fits with full logits")
            for micro_batch in dict.fromkeys([largest[False][0], largest[streamed][0]]):
                tps, mem = runner.throughput(micro_batch, args.warmup, args.steps)
                results.append((streamed, micro_batch, tps, mem))
            runner.close()
    load1 = C.load_average()

    rows = []
    for streamed, micro_batch, tps, mem in results:
        mfu = fpt * tps / peak if peak and math.isfinite(tps) else math.nan
        capped = " (search cap)" if largest[streamed][1] and micro_batch == largest[streamed][0] else ""
        rows.append(["streamed" if streamed else "naive (full logits)", f"{micro_batch}{capped}",
                     C.fmt(tps, 0), C.fmt(100 * mfu, 1), C.fmt(mem, 1)])
    table = C.markdown_table(["log p", "micro-batch", "tokens/s", "MFU %", "peak memory GiB"], rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({C.cpu_model()})"
    conditions = [
        f"device: {name}; peak bf16 {C.fmt((peak or math.nan) / 1e12, 0)} TFLOP/s"
        + (" (--peak-tflops)" if args.peak_tflops else "" if peak else " (unknown device: no MFU)"),
        f"model: {'tiny (--quick)' if args.quick else f'Qwen2.5-{size.upper()}-shaped'} Qwen2Config, random init,"
        f" {n_params / 1e6:.0f} M parameters, float32 weights,"
        f" bf16 autocast; {fpt / 1e9:.2f} GFLOP per trained token at sequence length {args.seq_len}",
        f"largest micro-batch that fits (x {args.seq_len} tokens): naive {largest[False][0]},"
        f" streamed {largest[True][0]}" + (" (search cap)" if largest[True][1] else "")
        + f"; streamed chunk_size {args.chunk_size}; fused AdamW (module default); every position a target",
        f"{args.warmup} warm-up + {args.steps} timed steps per row",
    ]
    return C.report(
        "GPU: tokens/s and MFU, naive vs streamed", "gpu_mfu.py", args, argv, threads, table, conditions,
        load=(load0, load1),
    )


if __name__ == "__main__":
    main()
