"""``probe``: where does the base model sit on the model-capability continuum for this data?

    python -m bnll_lightning probe --config configs/demo.yaml [--output report.json] [--max_batches N]

Reads the same config as ``fit``, runs the model over a seeded sample of the training rows
without training (eval mode, no gradients, log p streamed chunk by chunk exactly as in
validation) and prints the distribution of the target tokens' probability p, the zone, the
recommended objective and ready-to-paste YAML. Nothing is written except ``--output``.

Zones (arXiv 2510.00526, by the arithmetic mean p): **model-strong** at mean p >= 0.5 (prior-leaning
objectives such as −p win), **model-weak** below 0.1 (NLL wins), **model-intermediate** in between
(the objectives are on par).

Why more than the mean: the arithmetic mean is dominated by the many easy tokens (chat template,
answer format, copied words). Measured: on the built-in list-sorting task SmolLM2-135M-Instruct
gives the targets a mean p of 0.66 (model-strong by the rule) while it answers 0 of 100 rows right
by generation. The geometric mean (exp of the mean log p) and the low quantiles expose the hard
tokens that decide the answer, so the report prints them and flags a disagreement.

``--output`` JSON keys: ``model``, ``data``, ``split``, ``checkpoint``, ``batches``, ``rows``,
``tokens``, ``mean_p``, ``geometric_mean_p``, ``median_p``, ``quantiles`` (``{"0.1", "0.25",
"0.75", "0.9"}``: quantiles of p), ``tau``, ``fraction_below_tau``, ``nll``, ``token_accuracy``,
``thresholds`` (``{"strong": 0.5, "weak": 0.1}``), ``zone``, ``zone_geometric``, ``caution``
(a sentence or null), ``recommended`` (objective name), ``recommended_yaml``, ``adaptive_yaml``,
``generation`` (with ``--generate N``: ``{"rows", "correct", "accuracy", "checker", "max_new_tokens"}``,
the base model's answers to the first N val rows scored by the built-in task's checker; else null).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bnll_lightning.cli import SFTCLI, load_from_config
from bnll_lightning.evaluate import evaluate_generation, load_checkpoint_weights
from bnll_lightning.sampling import sample_batches
from bnll_lightning.tasks import TASKS

__all__ = [
    "REPORT_KEYS",
    "STRONG",
    "TAU",
    "WEAK",
    "ProbeCLI",
    "format_report",
    "main",
    "probe",
    "recommend",
    "sample_batches",
    "summarize",
    "zone",
]

# The paper's diagnostic: "prior-leaning above 0.5, NLL below 0.1" (mean token probability).
STRONG = 0.5
WEAK = 0.1
# The paper's threshold for ThresholdedNLL: the share of tokens under it is what that objective drops.
TAU = 0.2
QUANTILES = (0.1, 0.25, 0.75, 0.9)
ZONES = ("model-weak", "model-intermediate", "model-strong")
REPORT_KEYS = (
    "model", "data", "split", "checkpoint", "batches", "rows", "tokens", "mean_p", "geometric_mean_p",
    "median_p", "quantiles", "tau", "fraction_below_tau", "nll", "token_accuracy", "thresholds", "zone",
    "zone_geometric", "caution", "recommended", "recommended_yaml", "adaptive_yaml", "generation",
)  # fmt: skip


def zone(p: float, strong: float = STRONG, weak: float = WEAK) -> str:
    """``model-strong`` if ``p >= strong``, ``model-weak`` if ``p < weak``, else ``model-intermediate``."""
    if not weak < strong:
        raise ValueError(f"need weak < strong, got weak={weak}, strong={strong}")
    if p >= strong:
        return "model-strong"
    if p < weak:
        return "model-weak"
    return "model-intermediate"


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def target_logprobs(
    module: Any, batches: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu", context: Any = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each batch: (log p, whether the target is the argmax) of its target tokens, 1-D, on CPU.

    Uses ``module.eval_logprobs`` (streamed, no full logits; the same numbers as validation)."""
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with context() if context is not None else nullcontext():
            logp, mask, correct = module.eval_logprobs(batch)
        yield logp[mask].float().cpu(), correct[mask].cpu()


def summarize(logp: Tensor, correct: Tensor | None = None, tau: float = TAU) -> dict[str, Any]:
    """Figures of the report from the 1-D float log p of every target token (and argmax hits)."""
    lp = logp.detach().double().reshape(-1).numpy()
    n = int(lp.size)
    if n == 0:
        raise ValueError("no target tokens to summarize")
    p = np.exp(lp)
    q = np.quantile(p, (0.5, *QUANTILES))
    mean_p, geo = float(p.mean()), float(math.exp(lp.mean()))
    return {
        "tokens": n,
        "mean_p": mean_p,
        "geometric_mean_p": geo,
        "median_p": float(q[0]),
        "quantiles": {str(k): float(v) for k, v in zip(QUANTILES, q[1:])},
        "tau": float(tau),
        "fraction_below_tau": float((p < tau).mean()),
        "nll": float(-lp.mean()),
        "token_accuracy": None if correct is None else float(correct.float().mean()),
        "thresholds": {"strong": STRONG, "weak": WEAK},
        "zone": zone(mean_p),
        "zone_geometric": zone(geo),
    }


# ----------------------------------------------------------------------------- advice


_OBJECTIVE_YAML = {
    "model-strong": (
        "AlphaFamily(alpha=1) (-p)",
        """model:
  objective:
    class_path: bnll_lightning.objectives.AlphaFamily
    init_args:
      alpha: 1.0    # -p: prior-leaning; mean p >= 0.5 (model-strong)""",
    ),
    "model-intermediate": (
        "NLL",
        """model:
  objective:
    class_path: bnll_lightning.objectives.NLL    # 0.1 <= mean p < 0.5: objectives are on par""",
    ),
    "model-weak": (
        "NLL",
        """model:
  objective:
    class_path: bnll_lightning.objectives.NLL    # mean p < 0.1 (model-weak): NLL learns the unlikely tokens""",
    ),
}


def recommend(figures: dict[str, Any]) -> dict[str, Any]:
    """Recommended objective, YAML snippets and a caution for the figures of :func:`summarize`."""
    name, objective_yaml = _OBJECTIVE_YAML[figures["zone"]]
    caution = None
    if ZONES.index(figures["zone_geometric"]) < ZONES.index(figures["zone"]):
        caution = (
            f"the mean p says {figures['zone']} but the geometric mean p ({figures['geometric_mean_p']:.3f}) says "
            f"{figures['zone_geometric']}: easy tokens lift the mean while the 10 % quantile is "
            f"{figures['quantiles']['0.1']:.3g}. Check answers by generation before leaning on the prior, "
            "or let the adaptive controller follow the geometric mean (below)."
        )
    statistic = "geometric" if caution else "mean"
    why = "exp mean log p: not lifted by the easy tokens" if caution else "arithmetic mean p, the paper's diagnostic"
    adaptive_yaml = f"""model:
  objective:
    class_path: bnll_lightning.objectives.AlphaFamily
  alpha_controller:                  # alpha follows the model: NLL while weak, -p once confident
    class_path: bnll_lightning.alpha.AdaptiveAlpha
    init_args:
      alpha_max: 1.0
      statistic: {statistic:<24}# {why}
  probe_batches: 8                   # start alpha from this probe of the base model, not from NLL"""
    return {"caution": caution, "recommended": name, "recommended_yaml": objective_yaml, "adaptive_yaml": adaptive_yaml}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report printed by ``probe``."""
    q = report["quantiles"]
    acc = report.get("token_accuracy")
    lines = [
        f"probe: {report['model']} on {report['data']} ({report['split']} split, {report['rows']} rows, "
        f"{report['batches']} batches)" + (f", checkpoint {report['checkpoint']}" if report.get("checkpoint") else ""),
        f"  target tokens       {report['tokens']:,}",
        f"  mean p              {report['mean_p']:.4g}",
        f"  geometric mean p    {report['geometric_mean_p']:.4g}   (exp of the mean log p)",
        f"  median p            {report['median_p']:.4g}",
        "  quantiles of p      " + "  ".join(f"{float(k):.0%}: {v:.3g}" for k, v in q.items()),
        f"  p < tau = {report['tau']:<8g} {report['fraction_below_tau']:.1%} of the tokens (what ThresholdedNLL drops)",
        f"  NLL                 {report['nll']:.4f} nats/token",
    ]
    if acc is not None:
        lines.append(f"  token accuracy      {acc:.1%}   (target token is the argmax)")
    lines += [
        "",
        f"zone: {report['zone']}   (by mean p: model-strong >= {report['thresholds']['strong']}, "
        f"model-weak < {report['thresholds']['weak']}, intermediate in between; arXiv 2510.00526)",
        f"      {report['zone_geometric']} by the geometric mean p",
        "note: the arithmetic mean can mislead - easy tokens (template, format, copied words) lift it, and a",
        "      model can answer well in its own words while the training targets get a low mean p (measured",
        "      cases: docs/benchmarks.md). Read the geometric mean and the 10 % quantile too, and check whole",
        "      answers by generation (--generate N).",
    ]
    gen = report.get("generation")
    if gen:
        lines.append(
            f"base accuracy by generation: {gen['correct']}/{gen['rows']} ({gen['accuracy']:.1%}) of the first val rows"
            f" (built-in task checker, max_new_tokens {gen['max_new_tokens']})"
        )
    if report.get("caution"):
        lines.append(f"CAUTION: {report['caution']}")
    lines += [
        "",
        f"recommended objective: {report['recommended']}   (YAML: merge into the config, or pass as a 2nd --config)",
        report["recommended_yaml"],
        "",
        "alternative, adaptive alpha (the objective moves along the continuum as the model learns):",
        report["adaptive_yaml"],
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


@torch.no_grad()
def probe(
    module: Any,
    datamodule: Any,
    max_batches: int | None = 16,
    split: Literal["train", "val"] = "train",
    device: torch.device | str = "cpu",
    context: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``module``'s model over a seeded sample of ``split`` and return the report's figures.

    Eval mode and no gradients; the module's training mode is restored afterwards. Per-token
    log p are kept on CPU as float32 (4 bytes per target token, less than the tokenized data),
    so the quantiles are exact.
    """
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    if not isinstance(loader, DataLoader):
        raise ValueError(f"no {split} data to probe")
    batches = sample_batches(loader, max_batches)
    total = len(batches) if hasattr(batches, "__len__") else max_batches
    was_training = module.training
    module.eval()
    logps, hits, n_batches = [], [], 0
    try:
        stream = target_logprobs(module, batches, device=device, context=context)
        for logp, correct in tqdm(stream, total=total, desc="probe", unit="batch", disable=not progress):
            logps.append(logp)
            hits.append(correct)
            n_batches += 1
    finally:
        module.train(was_training)
    if not logps:
        raise ValueError(f"no {split} batches to probe")
    rows = len(batches.dataset) if isinstance(batches, DataLoader) else None
    figures = summarize(torch.cat(logps), torch.cat(hits))
    return {"batches": n_batches, "rows": rows, "split": split, **figures, **recommend(figures)}


class ProbeCLI(SFTCLI):
    """The ``fit`` config plus the probe's own options (read back from ``cli.config``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output", type=Optional[str], default=None, help="Write the report as JSON here.")
        parser.add_argument(
            "--max_batches", type=int, default=16,
            help="Batches of the sample to run (<= 0: the whole split). 16 x 8 rows give thousands of tokens.",
        )
        parser.add_argument("--split", type=Literal["train", "val"], default="train", help="Which split to probe.")
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="Probe the weights of this Lightning checkpoint (a fine-tuned model) instead of the base model.",
        )
        parser.add_argument(
            "--weights_only", type=Optional[bool], default=None,
            help="torch.load the checkpoint with weights_only (None: True, the safe loader).",
        )
        parser.add_argument(
            "--generate", type=int, default=0,
            help="Also answer the first N val rows by generation and score them with the built-in task's checker "
            "(0: off). Token probabilities cannot tell whether whole answers are right; this can.",
        )
        parser.add_argument("--max_new_tokens", type=int, default=64, help="Generation budget per answer (--generate).")
        parser.add_argument("--batch_size", type=int, default=16, help="Prompts generated together (--generate).")


def _generation(module: Any, data: Any, config: Any, context: Any) -> dict[str, Any] | None:
    """Base accuracy by generation on the first ``config.generate`` val rows (task checker only)."""
    rows = data.raw_rows("val")[: config.generate]
    if not rows or any(row.get("task") not in TASKS for row in rows):
        print("probe --generate: skipped, the val rows have no built-in task checker", flush=True)
        return None
    module.eval()
    with context():
        result = evaluate_generation(
            module.model, module.tokenizer, rows, data, "task",
            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        )  # fmt: skip
    return {
        "rows": result.n,
        "correct": result.correct,
        "accuracy": result.accuracy,
        "checker": "task",
        "max_new_tokens": config.max_new_tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m bnll_lightning probe --config X.yaml [--output report.json] [--max_batches N]``;
    prints the report and returns its figures (the ``--output`` JSON)."""
    cli = load_from_config(list(argv or []), ProbeCLI)
    config, model, data, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    if config.get("ckpt_path"):
        load_checkpoint_weights(model, config.ckpt_path, config.weights_only)
    data.set_tokenizer(model.tokenizer)
    model = trainer.precision_plugin.convert_module(model)
    device = trainer.strategy.root_device
    model.to(device)
    context = trainer.precision_plugin.forward_context
    figures = probe(model, data, max_batches=config.max_batches, split=config.split, device=device, context=context)
    report = {
        "model": config.model.model,
        "data": data.train if config.split == "train" else data.val or data.train,
        "checkpoint": config.get("ckpt_path"),
        "generation": _generation(model, data, config, context) if config.generate > 0 else None,
        **figures,
    }
    report = {key: report.get(key) for key in REPORT_KEYS}
    print(format_report(report), flush=True)
    if config.output:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"report written to {config.output}")
    return report
