"""Seconds per answer of validation's generation: a plain one-prompt-at-a-time loop without the KV cache against
``evaluate.generate`` (batched, left-padded, KV cache, stop at the end of the turn), the answers compared.

The demo's validation job: the embedded model's greedy answers to the first ``--rows`` validation prompts of
``builtin:sort`` (configs/demo.yaml: 32 rows, 32 new tokens, batch 16). The sides:

* **plain**: each prompt alone, ``model.generate`` with ``use_cache=False``, running all ``--max_new_tokens`` (no
  stop token): what a first generation loop does (on the first ``--plain_rows`` prompts only: it is slow);
* **one at a time, cache, stop**: each prompt alone, with the KV cache and the stop at the end of the turn;
* **ours**: ``bnll_lightning.evaluate.generate``, ``--batch_size`` prompts together.

Greedy answers must not depend on the batching: the table says how many of ours equal the one-at-a-time answers
(cut at the stop token). ``--repeats`` alternates the sides; a cell is the median [min-max].

    python benchmarks/generation.py --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _common as C
from bnll_lightning.evaluate import generate, stop_token_ids
from bnll_lightning.formatting import Formatter
from bnll_lightning.models import load_model, load_tokenizer
from bnll_lightning.tasks import get_task


def _alone(model, prompt: list[int], max_new_tokens: int, cache: bool, stops: list[int] | None, pad: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=0 if stops else max_new_tokens,
                         use_cache=cache, eos_token_id=stops, pad_token_id=pad)  # fmt: skip
    new = out[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(new) if stops and t in stops), len(new))
    return new[:cut]


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--model", default="embedded", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", type=int, default=32, help="validation prompts answered")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget per answer")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts ours generates together")
    parser.add_argument("--plain_rows", type=int, default=8,
                        help="prompts the plain side answers (seconds per answer: each answer ~30x ours on CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, the sides alternating")
    args = parser.parse_args(argv)
    threads = C.set_threads(args.threads)
    if args.quick:
        work = tempfile.TemporaryDirectory(prefix="bnll_generation_")  # removed when main returns
        model_dir = C.make_tiny_model(work.name)
        args.rows, args.max_new_tokens, args.repeats = min(args.rows, 4), min(args.max_new_tokens, 4), 1
    else:
        model_dir = args.model
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    formatter = Formatter(tokenizer)
    rows = get_task("sort").generate(args.rows, seed=1)  # a validation-like stream (the demo's val rows differ)
    prompts = [formatter.encode_prompt(r) for r in rows]
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sides = {
        "plain: one at a time, no KV cache, all tokens":
            lambda: [_alone(model, p, args.max_new_tokens, False, None, pad) for p in prompts[: args.plain_rows]],
        "one at a time, KV cache, stop at end of turn":
            lambda: [_alone(model, p, args.max_new_tokens, True, stops, pad) for p in prompts],
        f"ours: evaluate.generate, batch {args.batch_size}":
            lambda: [s[0] for s in generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size)],
    }  # fmt: skip
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    answers: dict[str, list[list[int]]] = {}
    load_start = C.load_average()
    with torch.no_grad():
        for r in range(args.repeats):
            for name in sides if r % 2 == 0 else reversed(list(sides)):
                start = time.perf_counter()
                answers[name] = sides[name]()
                seconds[name].append((time.perf_counter() - start) / len(answers[name]))
    load = (load_start, C.load_average())
    names = list(sides)
    alone, ours = answers[names[1]], answers[names[2]]
    same = sum(a == b for a, b in zip(alone, ours))
    tokens = {k: sum(len(a) for a in v) / len(v) for k, v in answers.items()}
    base = statistics.median(seconds[names[0]])
    table = C.markdown_table(
        ["side", "seconds per answer", "new tokens per answer", "speed-up over plain"],
        [[k, f"{statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]", f"{tokens[k]:.1f}",
          f"{base / statistics.median(v):.1f}x"] for k, v in seconds.items()],
    )  # fmt: skip
    conditions = [f"model: {args.model if not args.quick else 'tiny random'}; {len(prompts)} prompts of builtin:sort, "
                  f"greedy, max_new_tokens {args.max_new_tokens} (the plain side: the first {len(answers[names[0]])});"
                  f" {args.repeats} round(s), sides alternating",
                  f"ours' answers equal to the one-at-a-time answers: {same} of {len(prompts)}"]  # fmt: skip
    return C.report("Generation in validation: seconds per answer", "generation.py", args, argv, threads, table,
                    conditions, load=load)


if __name__ == "__main__":
    main()
