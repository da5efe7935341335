"""Probability-based SFT objectives, in pure torch (no Lightning).

Every objective here is a function of one number per target token, its log-probability log p.
``token_logprobs`` computes it from logits (float32, masked); the streamed path in
``bnll_lightning.streaming`` computes the same tensor without materialising the logits.
An objective then maps ``(logp, mask)`` to a scalar loss with ``from_logprobs``; calling it on
``(logits, labels)`` does both steps, so the classes drop into any training loop::

    loss = AlphaFamily(alpha=1.0)(logits, labels).loss

Notation: p = exp(log p) is the model's probability of the reference token, f(p) the per-token
loss, and W_f(p) = -f'(p) p (1 - p) the weight the objective puts on the correct logit's
gradient (Lemma 3.1 of *Beyond Log Likelihood*, arXiv 2510.00526): NLL has W = 1 - p, the
f_alpha family W = p^alpha (1 - p). Gradients flow through p, as in the paper's code, so the
gradient of -p is p times the gradient of -log p.

Normalisation: the loss of a batch is the sum of f(p) over the counted tokens divided by their
number (all target tokens, or the selected ones for selecting objectives). ``ObjectiveOutput``
also carries the sum and the count, so a trainer can normalise exactly over a whole optimizer
step (gradient accumulation, several ranks). A batch with no counted token has loss 0 and a
zero gradient, never NaN.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from bnll_lightning.constraints import NonNegativeFloat, UnitIntervalClosedOpen, UnitIntervalOpenClosed

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ObjectiveOutput",
    "token_logprobs",
    "Objective",
    "NLL",
    "NegProb",
    "AlphaFamily",
    "ThresholdedNLL",
    "TopFraction",
    "DFT",
    "Focal",
]


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Float32 log-probability of each target token.

    Args:
        logits: ``[B, T, V]`` in any float dtype; upcast to float32 here, so bf16 logits give
            float32 log p.
        labels: ``[B, T]`` aligned with ``logits`` (``labels[:, t]`` is the target of
            ``logits[:, t]``); positions equal to ``ignore_index`` are not targets.

    Returns:
        ``(logp, mask)``: ``logp`` ``[B, T]`` float32, 0 where ``mask`` is False; ``mask`` the bool
        tensor of target positions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    mask = labels != ignore_index
    logits = logits.float()
    target = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    logp = target - torch.logsumexp(logits, dim=-1)
    return logp.masked_fill(~mask, 0.0), mask


class ObjectiveOutput(NamedTuple):
    """What an objective returns; unpacks as a tuple whose first element is the loss."""

    loss: Tensor
    """Scalar loss: ``loss_sum / normalizer`` (0 when the normalizer is 0)."""
    loss_sum: Tensor
    """Sum of f(p) over the counted tokens."""
    normalizer: Tensor
    """Number of tokens the sum is divided by (float32, 0-dim)."""
    selected: Tensor
    """Bool ``[B, T]``: the tokens that carry loss and gradient."""


class Objective(nn.Module):
    """Base class: a loss that is a function of the target tokens' log p.

    Subclasses define ``per_token`` (the loss of each token from its log p) and, if they pick a
    subset of tokens, ``select``. Elementwise objectives also define ``f`` and
    ``gradient_weight`` as functions of p, for analysis and plots.
    """

    normalize: Literal["selected", "all"] = "all"

    @property
    def alpha(self) -> float | None:
        """The alpha of the f_alpha family this objective is a member of (None if it is not)."""
        return None

    def per_token(self, logp: Tensor) -> Tensor:
        raise NotImplementedError

    def select(self, logp: Tensor, mask: Tensor) -> Tensor:
        """Tokens that carry the loss; all target tokens unless a subclass selects."""
        return mask

    def f(self, p: Tensor) -> Tensor:
        """Per-token loss as a function of p."""
        return self.per_token(torch.log(p))

    def gradient_weight(self, p: Tensor) -> Tensor:
        """W_f(p) = -f'(p) p (1 - p): the weight on the correct logit's gradient."""
        raise NotImplementedError

    def from_logprobs(self, logp: Tensor, mask: Tensor) -> ObjectiveOutput:
        """The loss from float32 ``logp`` ``[B, T]`` and the bool target ``mask``."""
        selected = self.select(logp, mask)
        # Unselected positions are evaluated at a harmless log p (-1) and dropped with where(),
        # so neither their value nor a 0 * inf in their backward can reach the gradient.
        per_token = self.per_token(logp.masked_fill(~selected, -1.0))
        loss_sum = torch.where(selected, per_token, 0.0).sum()
        normalizer = (selected if self.normalize == "selected" else mask).sum().float()
        return ObjectiveOutput(loss_sum / normalizer.clamp_min(1.0), loss_sum, normalizer, selected)

    def forward(self, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> ObjectiveOutput:
        return self.from_logprobs(*token_logprobs(logits, labels, ignore_index))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.tag_args().items())

    def tag_args(self) -> dict[str, object]:
        """Arguments that tell runs of this objective apart (used in run names)."""
        return {}

    @property
    def tag(self) -> str:
        """Short name for log directories, e.g. ``AlphaFamily-alpha1.0``."""
        args = "".join(f"-{k}{v}" for k, v in self.tag_args().items())
        return type(self).__name__ + args


def _check_normalize(normalize: str) -> str:
    if normalize not in ("selected", "all"):
        raise ValueError(f"normalize must be 'selected' or 'all', got {normalize!r}")
    return normalize


class NLL(Objective):
    """Negative log-likelihood, -log p: standard SFT (the f_alpha family at alpha = 0)."""

    @property
    def alpha(self) -> float:
        return 0.0

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp

    def gradient_weight(self, p: Tensor) -> Tensor:
        return 1 - p


class AlphaFamily(Objective):
    """f_alpha(p) = (1 - p^alpha) / alpha: NLL at alpha = 0, 1 - p at alpha = 1, prior-leaning above.

    Computed as -expm1(alpha log p) / alpha, which is exact for small alpha, and as -log p at
    alpha = 0 exactly. ``alpha`` may be changed between steps (schedules, the adaptive controller).

    Args:
        alpha: Exponent, >= 0. 0 is NLL; 1 is -p (up to a constant); 10 is the paper's
            prior-leaning setting for model-strong tasks.
    """

    def __init__(self, alpha: NonNegativeFloat = 1.0):
        super().__init__()
        self.alpha = alpha

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"AlphaFamily.alpha must be a finite number >= 0, got {value}")
        self._alpha = value

    def per_token(self, logp: Tensor) -> Tensor:
        if self._alpha == 0.0:
            return -logp
        return -torch.expm1(self._alpha * logp) / self._alpha

    def gradient_weight(self, p: Tensor) -> Tensor:
        return p.pow(self._alpha) * (1 - p)

    def tag_args(self) -> dict[str, object]:
        return {"alpha": self._alpha}


class NegProb(AlphaFamily):
    """-p, as its non-negative form 1 - p (the f_alpha family at alpha = 1; same gradient)."""

    def __init__(self):
        super().__init__(alpha=1.0)

    def tag_args(self) -> dict[str, object]:
        return {}


class ThresholdedNLL(Objective):
    """-log p on tokens with p >= tau only: cheap prior-leaning (drops tokens the model finds unlikely).

    The selection uses the detached p, so it carries no gradient.

    Args:
        tau: Probability threshold in [0, 1); the paper uses 0.2.
        normalize: ``"selected"`` divides by the number of kept tokens (the paper's code),
            ``"all"`` by all target tokens.
    """

    normalize: Literal["selected", "all"]

    def __init__(self, tau: UnitIntervalClosedOpen = 0.2, normalize: Literal["selected", "all"] = "selected"):
        super().__init__()
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"ThresholdedNLL.tau must be in [0, 1), got {tau}")
        self.tau = float(tau)
        self.normalize = _check_normalize(normalize)
        self._log_tau = math.log(tau) if tau > 0 else -math.inf

    def select(self, logp: Tensor, mask: Tensor) -> Tensor:
        return mask & (logp.detach() >= self._log_tau)

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp

    def f(self, p: Tensor) -> Tensor:
        return torch.where(p >= self.tau, -torch.log(p), 0.0)

    def gradient_weight(self, p: Tensor) -> Tensor:
        return torch.where(p >= self.tau, 1 - p, 0.0)

    def tag_args(self) -> dict[str, object]:
        return {"tau": self.tau}


class TopFraction(Objective):
    """NLL on the ``fraction`` most probable target tokens of the batch (ceil(fraction * n) of n).

    Not elementwise: which tokens count depends on the batch. Selection is on detached log p,
    exact (ties broken by position) and free of host synchronisation.

    Args:
        fraction: Share of target tokens kept, in (0, 1].
        normalize: ``"selected"`` divides by the number of kept tokens (the paper's code),
            ``"all"`` by all target tokens.
    """

    normalize: Literal["selected", "all"]

    def __init__(self, fraction: UnitIntervalOpenClosed = 0.1, normalize: Literal["selected", "all"] = "selected"):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"TopFraction.fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.normalize = _check_normalize(normalize)

    def select(self, logp: Tensor, mask: Tensor) -> Tensor:
        flat = logp.detach().masked_fill(~mask, -math.inf).flatten()
        order = flat.argsort(descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        k = torch.ceil(mask.sum() * self.fraction)
        return mask & (rank.view_as(mask) < k)

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp

    def gradient_weight(self, p: Tensor) -> Tensor:
        """W of NLL, on the selected tokens (0 on the rest)."""
        return 1 - p

    def tag_args(self) -> dict[str, object]:
        return {"fraction": self.fraction}


class DFT(Objective):
    """Dynamic fine-tuning, -sg(p) log p: the gradient of -p with the scale of NLL's value."""

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp.detach().exp() * logp

    def f(self, p: Tensor) -> Tensor:
        return -p * torch.log(p)

    def gradient_weight(self, p: Tensor) -> Tensor:
        return p * (1 - p)


class Focal(Objective):
    """Focal loss, -(1 - p)^gamma log p: prior-averse (leans harder on unlikely tokens than NLL).

    Args:
        gamma: Focusing exponent, >= 0; 0 is NLL.
    """

    def __init__(self, gamma: NonNegativeFloat = 2.0):
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"Focal.gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def per_token(self, logp: Tensor) -> Tensor:
        # 1 - p clamped away from 0: at p == 1, (1 - p)^gamma has an infinite slope for gamma < 1.
        return -(-torch.expm1(logp)).clamp_min(1e-12).pow(self.gamma) * logp

    def gradient_weight(self, p: Tensor) -> Tensor:
        q = 1 - p
        return q.pow(self.gamma + 1) - self.gamma * p * q.pow(self.gamma) * torch.log(p)

    def tag_args(self) -> dict[str, object]:
        return {"gamma": self.gamma}
