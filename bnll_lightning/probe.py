"""The capability diagnosis: where the base model sits on the model-capability continuum for this data.

Runs the model over a seeded sample of the training rows without training (eval mode, no gradients,
log p streamed chunk by chunk exactly as in validation) and summarizes the distribution of the target
tokens' probability p: the zone, the recommended objective and ready-to-paste YAML. The ``probe``
subcommand (:func:`bnll_lightning.cli.probe_main`) runs it from a ``fit`` config:

    python -m bnll_lightning probe --config configs/demo.yaml [--output report.json] [--max_batches N]

Zones (arXiv 2510.00526, by the arithmetic mean p): **model-strong** at mean p >= 0.5 (prior-leaning
objectives such as −p win), **model-weak** below 0.1 (NLL wins), **model-intermediate** in between
(the objectives are on par).

Why more than the mean: the arithmetic mean is dominated by the many easy tokens (chat template,
answer format, copied words): a model can give the targets a mean p that the rule calls model-strong
while it answers almost no row right by generation (measured cases: docs/benchmarks.md). The
geometric mean (exp of the mean log p) and the low quantiles expose the hard tokens that decide the
answer, so the report prints them and flags a disagreement.

Report keys (:data:`REPORT_KEYS`, the ``--output`` JSON): ``model``, ``data``, ``split``, ``checkpoint``,
``batches``, ``rows``, ``tokens``, ``mean_p``, ``geometric_mean_p``, ``median_p``, ``quantiles``
(``{"0.1", "0.25", "0.75", "0.9"}``: quantiles of p), ``tau``, ``fraction_below_tau``, ``nll``,
``token_accuracy``, ``thresholds`` (``{"strong": 0.5, "weak": 0.1}``), ``zone``, ``zone_geometric``,
``caution`` (a sentence or null), ``recommended`` (objective name), ``recommended_yaml``, ``adaptive_yaml``,
``generation`` (with ``--generate N``: ``{"rows", "correct", "accuracy", "checker", "max_new_tokens"}``,
the base model's answers to the first N val rows scored by the built-in task's checker; else null).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bnll_lightning.modes import eval_mode
from bnll_lightning.sampling import sample_batches

__all__ = [
    "REPORT_KEYS",
    "STRONG",
    "TAU",
    "WEAK",
    "format_report",
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
            "or let the adaptive controller decide (below): it trains with NLL until the median token is learned."
        )
    # The controller's defaults, without a warm start: a strong base model would otherwise skip the NLL phase.
    adaptive_yaml = """model:
  objective:
    class_path: bnll_lightning.objectives.AlphaFamily
  alpha_controller:                  # NLL until the median target token is learned (median p 0.9), -p from 0.99
    class_path: bnll_lightning.alpha.AdaptiveAlpha"""
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
    ]
    if report["zone"] == "model-strong":
        lines += [
            "if the labels may be noisy: keep -p's best checkpoint by validation (a ModelCheckpoint with monitor:",
            "      val/mean_p, mode: max and save_top_k: 1 beside the config's callbacks): at 40 % label noise it beat",
            "      NLL early-stopped on val/nll on 3 of 4 strong tasks and tied on the 4th (README, 'Which objective when')",
        ]
    lines += [
        "",
        "alternative, adaptive alpha (the objective moves along the continuum as the model learns):",
        report["adaptive_yaml"],
        "with a validation split: --config configs/objectives/plateau.yaml (PlateauAlpha: the same alpha until",
        "      val/mean_p misses its best, then -p from the best weights; without validation it runs as the above):",
        "      on the studies' 18 cells it ties this one's worst case and beats its mean",
        "      (README, 'Which objective when')",
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

    Eval mode and no gradients, log p from the module's head (``module.head.eval``: the numbers of
    validation); the module's training mode is restored afterwards. Per-token log p are kept on CPU
    as float32 (4 bytes per target token, less than the tokenized data), so the quantiles are exact.
    """
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    if not isinstance(loader, DataLoader):
        raise ValueError(f"no {split} data to probe")
    batches = sample_batches(loader, max_batches)
    total = len(batches) if hasattr(batches, "__len__") else max_batches
    logps, hits, n_batches = [], [], 0
    with eval_mode(module):
        for batch in tqdm(batches, total=total, desc="probe", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            with context() if context is not None else nullcontext():
                logp, mask, correct = module.head.eval(module.model, batch)
            logps.append(logp[mask].float().cpu())
            hits.append(correct[mask].cpu())
            n_batches += 1
    if not logps:
        raise ValueError(f"no {split} batches to probe")
    rows = len(batches.dataset) if isinstance(batches, DataLoader) else None
    figures = summarize(torch.cat(logps), torch.cat(hits))
    return {"batches": n_batches, "rows": rows, "split": split, **figures, **recommend(figures)}
