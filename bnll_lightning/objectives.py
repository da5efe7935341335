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

Beyond log p: an objective may declare (``requires``, a :class:`StatsRequest`) that it also needs
the entropy of each token's distribution, its top-k entropy, or the KL divergence to a frozen
reference model and the reference's log p. It then receives them in a :class:`TokenStats` through
``from_stats``; the streamed path computes them from the same chunks of logits as log p (no extra
head matmul for the policy), and only when asked, so log-p-only objectives cost what they did.
``token_stats`` is the full-logits reference for the same numbers.

Normalisation: the loss of a batch is the sum of f(p) over the counted tokens divided by their
number (all target tokens, or the selected ones for selecting objectives). With per-token
``weights`` (a row's weight on each of its tokens) it is sum(w f(p)) / sum(w) over the same
tokens, so weight 2 counts a token twice. ``ObjectiveOutput`` also carries the sum and the
count, so a trainer can normalise exactly over a whole optimizer step (gradient accumulation,
several ranks). A batch with no counted token (or only weights 0) has loss 0 and a zero
gradient, never NaN.
"""

from __future__ import annotations

import fractions
import math
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bnll_lightning.constraints import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveInt,
    UnitIntervalClosedOpen,
    UnitIntervalOpenClosed,
)

if TYPE_CHECKING:
    from bnll_lightning.reference import FrozenReference

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ObjectiveOutput",
    "StatsRequest",
    "TokenStats",
    "token_logprobs",
    "token_stats",
    "Objective",
    "LogpLoss",
    "SupportsAlpha",
    "NLL",
    "NegProb",
    "AlphaFamily",
    "ThresholdedNLL",
    "TopFraction",
    "DFT",
    "Focal",
    "EAFT",
    "ASFT",
    "TokenAlpha",
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


class StatsRequest(NamedTuple):
    """What an objective needs per target token besides log p (the default needs nothing else)."""

    entropy: bool = False
    """Shannon entropy of the model's full next-token distribution (detached)."""
    topk: int = 0
    """k > 0: entropy of the model's top-k logits renormalised (detached); 0: not needed."""
    reference: bool = False
    """A frozen reference model: the KL to it (differentiable) and its log p of the target."""
    kl: Literal["forward", "reverse"] = "forward"
    """With ``reference``: ``forward`` is KL(ref || model), ``reverse`` KL(model || ref)."""

    @property
    def any(self) -> bool:
        """Whether anything beyond log p is asked for."""
        return self.entropy or self.topk > 0 or self.reference


class TokenStats(NamedTuple):
    """Per-token statistics of one batch, all float32 ``[B, T]`` and 0 where ``mask`` is False.

    Fields an objective did not ask for are None.
    """

    logp: Tensor
    """log p of the target token (differentiable)."""
    mask: Tensor
    """Bool ``[B, T]``: the target positions."""
    entropy: Tensor | None = None
    """Entropy (nats) of the model's distribution over the whole vocabulary (detached)."""
    topk_entropy: Tensor | None = None
    """Entropy (nats) of the softmax of the model's ``k`` largest logits (detached)."""
    kl: Tensor | None = None
    """KL divergence (nats) between the model's and the reference's distributions, full
    vocabulary, in the requested direction (differentiable w.r.t. the model only)."""
    ref_logp: Tensor | None = None
    """The reference model's log p of the target token (detached)."""
    weights: Tensor | None = None
    """Float32 weight of each target token (its row's weight, >= 0); None: every token weighs 1."""


def _entropy(logq: Tensor) -> Tensor:
    """Entropy along the last dim from float32 log-probabilities."""
    return -(logq.exp() * logq).sum(-1)


def token_stats(
    logits: Tensor,
    labels: Tensor,
    request: StatsRequest = StatsRequest(),
    ignore_index: int = IGNORE_INDEX,
    ref_logits: Tensor | None = None,
) -> TokenStats:
    """:class:`TokenStats` from full logits ``[B, T, V]`` (the reference the streamed path matches).

    Args:
        logits: ``[B, T, V]`` model logits, any float dtype (float32 from here on).
        labels: ``[B, T]`` aligned targets (see :func:`token_logprobs`).
        request: What to compute beyond log p.
        ref_logits: ``[B, T, V]`` logits of the frozen reference, needed when
            ``request.reference``; no gradient flows into them.
    """
    logp, mask = token_logprobs(logits, labels, ignore_index)
    if not request.any:
        return TokenStats(logp, mask)
    entropy = topk_entropy = kl = ref_logp = None
    logq = torch.log_softmax(logits.float(), dim=-1) if request.entropy or request.reference else None
    if request.entropy:
        entropy = _entropy(logq.detach()).masked_fill(~mask, 0.0)
    if request.topk > 0:
        top = logits.detach().float().topk(min(request.topk, logits.shape[-1]), dim=-1).values
        topk_entropy = _entropy(top.log_softmax(-1)).masked_fill(~mask, 0.0)
    if request.reference:
        if ref_logits is None or ref_logits.shape != logits.shape:
            got = None if ref_logits is None else tuple(ref_logits.shape)
            raise ValueError(f"a reference objective needs ref_logits of shape {tuple(logits.shape)}, got {got}")
        logr = torch.log_softmax(ref_logits.detach().float(), dim=-1)
        if request.kl == "forward":
            kl = (logr.exp() * (logr - logq)).sum(-1)
        else:
            kl = (logq.exp() * (logq - logr)).sum(-1)
        kl = torch.where(mask, kl, 0.0)
        ref_logp = logr.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    return TokenStats(logp, mask, entropy, topk_entropy, kl, ref_logp)


class ObjectiveOutput(NamedTuple):
    """What an objective returns; unpacks as a tuple whose first element is the loss."""

    loss: Tensor
    """Scalar loss: ``loss_sum / normalizer`` (0 when the normalizer is 0)."""
    loss_sum: Tensor
    """Sum of f(p) over the counted tokens."""
    normalizer: Tensor
    """Number of tokens (with weights: their summed weight) the sum is divided by (float32, 0-dim)."""
    selected: Tensor
    """Bool ``[B, T]``: the tokens that carry loss and gradient."""


class Objective(nn.Module):
    """Base class of the losses: what an objective needs (``requires``) and the loss from it (``from_stats``).

    ``tag`` names a run of it. An objective of log p alone mixes in :class:`LogpLoss`; one an
    alpha controller can drive is also a :class:`SupportsAlpha`.
    """

    selects: ClassVar[bool] = False
    """True if only some target tokens carry the loss (``ObjectiveOutput.selected``): the trainer
    then logs the selected fraction."""

    @property
    def alpha(self) -> float | None:
        """The alpha of the f_alpha family this objective is a member of (None if it is not)."""
        return None

    # Plain class attributes, read every micro-batch; an objective that needs more overrides them with properties.
    requires: StatsRequest = StatsRequest()
    """Per-token statistics beyond log p this objective needs (none by default)."""
    reference: FrozenReference | None = None
    """The frozen reference model behind ``requires.reference`` (None when not needed)."""

    def from_stats(self, stats: TokenStats) -> ObjectiveOutput:
        """The loss from :class:`TokenStats` (what the trainer calls)."""
        raise NotImplementedError

    def forward(
        self, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, ref_logits: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> ObjectiveOutput:
        """The loss from full logits (``ref_logits``: the frozen reference's, when ``requires.reference``;
        ``weights``: per-token weights aligned with ``labels``)."""
        stats = token_stats(logits, labels, self.requires, ignore_index, ref_logits)
        return self.from_stats(stats._replace(weights=weights))

    def _missing(self, name: str) -> ValueError:
        return ValueError(
            f"{type(self).__name__} needs each token's {name}: call from_stats() with TokenStats that carry it "
            "(SFTModule.target_stats, streaming.streamed_token_stats or objectives.token_stats), or call the "
            "objective on (logits, labels)"
        )

    @staticmethod
    def _sum(per_token: Tensor, selected: Tensor, counted: Tensor, weights: Tensor | None) -> ObjectiveOutput:
        """Sum of ``per_token`` (times ``weights``) over ``selected``, divided by the number (the summed
        weight) of the ``counted`` tokens; 0 if that is 0."""
        if weights is None:
            loss_sum, normalizer = torch.where(selected, per_token, 0.0).sum(), counted.sum().float()
        else:
            loss_sum = torch.where(selected, per_token * weights, 0.0).sum()
            normalizer = torch.where(counted, weights, 0.0).sum()
        return ObjectiveOutput(loss_sum / torch.where(normalizer > 0, normalizer, 1.0), loss_sum, normalizer, selected)

    @classmethod
    def _reduce(cls, per_token: Tensor, mask: Tensor, weights: Tensor | None = None) -> ObjectiveOutput:
        """Sum of ``per_token`` over ``mask`` divided by the number of target tokens (their summed weight)."""
        return cls._sum(per_token, mask, mask, weights)

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


@runtime_checkable
class SupportsAlpha(Protocol):
    """An objective an alpha controller (``AdaptiveAlpha``, the schedules) can drive: the controller
    gives it its alpha with ``set_alpha`` before every optimizer step (``AlphaFamily``, ``TokenAlpha``)."""

    def set_alpha(self, value: float) -> None:
        """Compute the loss with ``value`` from now on."""


class LogpLoss:
    """Mixin for an :class:`Objective` of log p alone: ``per_token`` is each token's loss from its log p.

    An objective that keeps only some tokens sets ``selects`` and defines ``select``. Elementwise
    objectives also define ``f`` and ``gradient_weight`` as functions of p, for analysis and plots.
    """

    normalize: Literal["selected", "all"] = "all"

    def per_token(self, logp: Tensor) -> Tensor:
        raise NotImplementedError

    def select(self, logp: Tensor, mask: Tensor) -> Tensor:
        """Tokens that carry the loss; all target tokens unless the objective ``selects``."""
        return mask

    def f(self, p: Tensor) -> Tensor:
        """Per-token loss as a function of p."""
        return self.per_token(torch.log(p))

    def gradient_weight(self, p: Tensor) -> Tensor:
        """W_f(p) = -f'(p) p (1 - p): the weight on the correct logit's gradient."""
        raise NotImplementedError

    def from_logprobs(self, logp: Tensor, mask: Tensor, weights: Tensor | None = None) -> ObjectiveOutput:
        """The loss from float32 ``logp`` ``[B, T]``, the bool target ``mask`` and optional per-token ``weights``."""
        # LogpLoss's own from_stats: a subclass's from_stats may call this one (TokenAlpha does).
        return LogpLoss.from_stats(self, TokenStats(logp, mask, weights=weights))

    def from_stats(self, stats: TokenStats) -> ObjectiveOutput:
        """The loss from :class:`TokenStats`: here from its log p, mask and weights."""
        logp, mask = stats.logp, stats.mask
        selected = self.select(logp, mask) if self.selects else mask
        # Unselected positions are evaluated at a harmless log p (-1) and dropped with where(),
        # so neither their value nor a 0 * inf in their backward can reach the gradient.
        per_token = self.per_token(logp.masked_fill(~selected, -1.0))
        return Objective._sum(per_token, selected, selected if self.normalize == "selected" else mask, stats.weights)


def _check_normalize(normalize: str) -> str:
    if normalize not in ("selected", "all"):
        raise ValueError(f"normalize must be 'selected' or 'all', got {normalize!r}")
    return normalize


class NLL(LogpLoss, Objective):
    """Negative log-likelihood, -log p: standard SFT (the f_alpha family at alpha = 0)."""

    @property
    def alpha(self) -> float:
        return 0.0

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp

    def gradient_weight(self, p: Tensor) -> Tensor:
        return 1 - p


class AlphaFamily(LogpLoss, Objective):
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

    def set_alpha(self, value: float) -> None:
        """Compute the loss with alpha ``value`` from now on (an alpha controller's call)."""
        self.alpha = value

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

    set_alpha = None  # not SupportsAlpha: -p is alpha = 1
    why_no_alpha = "it fixes alpha = 1 (use AlphaFamily, which the controller moves)"

    def __init__(self):
        super().__init__(alpha=1.0)

    def tag_args(self) -> dict[str, object]:
        return {}


class ThresholdedNLL(LogpLoss, Objective):
    """-log p on tokens with p >= tau only: cheap prior-leaning (drops tokens the model finds unlikely).

    The selection uses the detached p, so it carries no gradient.

    Args:
        tau: Probability threshold in [0, 1); the paper uses 0.2.
        normalize: ``"selected"`` divides by the number of kept tokens (the paper's code),
            ``"all"`` by all target tokens.
    """

    normalize: Literal["selected", "all"]
    selects = True

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


class TopFraction(LogpLoss, Objective):
    """NLL on the ``fraction`` most probable target tokens of the batch (ceil(fraction * n) of n).

    Not elementwise: which tokens count depends on the batch, and the batch is the micro-batch of
    one rank (under accumulation or several ranks the selection is not that of one big batch). Selection is on detached log p,
    exact (ties broken by position) and free of host synchronisation.

    Args:
        fraction: Share of target tokens kept, in (0, 1].
        normalize: ``"selected"`` divides by the number of kept tokens (the paper's code),
            ``"all"`` by all target tokens.
    """

    normalize: Literal["selected", "all"]
    selects = True

    def __init__(self, fraction: UnitIntervalOpenClosed = 0.1, normalize: Literal["selected", "all"] = "selected"):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"TopFraction.fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        ratio = fractions.Fraction(self.fraction).limit_denominator(1_000_000)
        self._ratio = (ratio.numerator, ratio.denominator)
        self.normalize = _check_normalize(normalize)

    def select(self, logp: Tensor, mask: Tensor) -> Tensor:
        flat = logp.detach().masked_fill(~mask, -math.inf).flatten()
        order = flat.argsort(descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        # ceil(n * fraction) in integers: in float, ceil(100 * 0.3) is 31 (0.3 is 0.30000000000000004).
        num, den = self._ratio
        k = (mask.sum() * num + den - 1) // den
        return mask & (rank.view_as(mask) < k)

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp

    def gradient_weight(self, p: Tensor) -> Tensor:
        """W of NLL, on the selected tokens (0 on the rest)."""
        return 1 - p

    def tag_args(self) -> dict[str, object]:
        return {"fraction": self.fraction}


class DFT(LogpLoss, Objective):
    """Dynamic fine-tuning, -sg(p) log p: the gradient of -p with the scale of NLL's value."""

    def per_token(self, logp: Tensor) -> Tensor:
        return -logp.detach().exp() * logp

    def f(self, p: Tensor) -> Tensor:
        return -p * torch.log(p)

    def gradient_weight(self, p: Tensor) -> Tensor:
        return p * (1 - p)


class Focal(LogpLoss, Objective):
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


# --------------------------------------------------------------------------------------------
# Objectives that need more than log p (entropy, a frozen reference model)
# --------------------------------------------------------------------------------------------


class EAFT(Objective):
    """Entropy-adaptive fine-tuning (EAFT, arXiv 2601.02151): -log p gated by the model's own
    uncertainty, f = (H_k / c)^power * (-log p), the gate detached.

    H_k is the entropy (nats) of the softmax of the model's ``k`` largest logits at that position
    (the top-k renormalised, as the paper's code computes it): high when the model hesitates,
    near 0 when it is sure. A token the model is sure of *and* disagrees with (a "confident
    conflict", low p and low H_k) gets little gradient; one it is unsure about trains as NLL.

    Normalisation c: ``normalizer`` if given, else ln k, the largest entropy k outcomes can have,
    so the gate lies in [0, 1]. LLaMA-Factory divides by 3.0 (its k = 20 and ln 20 = 2.996);
    axolotl does not divide (c = 1, gate up to (ln k)^power). Because (H_k / c)^power =
    H_k^power / c^power, c scales the loss and its gradient by one constant: it changes the
    effective learning rate, not which tokens count. ``normalizer: 3.0`` reproduces
    LLaMA-Factory, ``normalizer: 1.0`` axolotl. Divided by the number of target tokens, as both.

    Args:
        power: Exponent of the gate, >= 0 (LLaMA-Factory's and axolotl's ``eaft_alpha``, default
            1). 0 is NLL; larger values silence confident tokens harder.
        k: Logits the entropy is taken over, >= 2 (the paper's 20). Cheap: a top-k per token.
        normalizer: c above, > 0; None = ln k (gate in [0, 1]).
    """

    why_no_alpha = "its power gates -log p by the entropy; it is not the f_alpha family's alpha"

    def __init__(self, power: NonNegativeFloat = 1.0, k: PositiveInt = 20, normalizer: float | None = None):
        super().__init__()
        if not (power >= 0 and math.isfinite(power)):
            raise ValueError(f"EAFT.power must be a finite number >= 0, got {power}")
        if int(k) != k or k < 2:
            raise ValueError(f"EAFT.k must be an integer >= 2 (the entropy of one logit is 0), got {k}")
        if normalizer is not None and not (normalizer > 0 and math.isfinite(normalizer)):
            raise ValueError(f"EAFT.normalizer must be a finite number > 0 or None, got {normalizer}")
        self.power, self.k = float(power), int(k)
        self.normalizer = math.log(self.k) if normalizer is None else float(normalizer)

    @property
    def requires(self) -> StatsRequest:
        return StatsRequest(topk=self.k)

    def gate(self, topk_entropy: Tensor) -> Tensor:
        """(H_k / c)^power: the weight on each token's -log p."""
        return (topk_entropy.detach() / self.normalizer).pow(self.power)

    def from_logprobs(self, logp: Tensor, mask: Tensor, weights: Tensor | None = None) -> ObjectiveOutput:
        raise self._missing("top-k entropy")

    def from_stats(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.topk_entropy is None:
            raise self._missing("top-k entropy")
        return self._reduce(-stats.logp * self.gate(stats.topk_entropy), stats.mask, stats.weights)

    def tag_args(self) -> dict[str, object]:
        return {"power": self.power, "k": self.k}


class ASFT(Objective):
    """Anchored supervised fine-tuning (ASFT, arXiv 2509.23753): DFT plus ``kl_weight`` times the
    KL divergence to a frozen reference model, f = -sg(p) log p + lambda * KL_t.

    KL_t is taken over the whole vocabulary at every target position. ``direction: forward`` is
    KL(ref || model) = sum_v q_v (log q_v - log p_v), what the ASFT and LLaMA-Factory code compute
    (``F.kl_div(log p_model, p_ref)``; the paper's text writes the reverse); ``reverse`` is
    KL(model || ref). Both terms are divided by the number of target tokens (LLaMA-Factory's
    means). On the streamed path the KL and its gradient come chunk by chunk from the two
    models' hidden states, beside log p: neither model's ``[B, T, V]`` logits ever exist.

    The reference is loaded once, frozen (no gradient, eval mode: no dropout) and kept outside
    the trained module: it is not in the optimizer, the checkpoints or the exported model. It
    costs its weights in memory and one forward pass per step (see benchmarks/memory.py and
    objective_overhead.py). Not driven by an alpha controller: DFT's gradient is fixed at that of
    -p and the anchor has no alpha.

    Args:
        kl_weight: lambda >= 0, the anchor's strength (LLaMA-Factory's ``asft_alpha``, 0.1).
        reference: The anchor model: hub id, local directory or ``embedded``; None = the model
            being fine-tuned, as loaded before training (``SFTModule`` supplies it).
        reference_dtype: dtype of the reference's weights (``float32``, ``bfloat16``,
            ``float16``, ``auto``); None = the trained model's ``dtype``. bfloat16 halves its memory.
        reference_load_in_8bit: Load the reference with int8 weights (bitsandbytes, CUDA only):
            about a quarter of float32 memory; the output head stays unquantised (it is streamed).
        direction: ``forward`` (KL(ref || model), the ASFT code) or ``reverse`` (KL(model || ref)).
    """

    def __init__(
        self,
        kl_weight: NonNegativeFloat = 0.1,
        reference: str | None = None,
        reference_dtype: str | None = None,
        reference_load_in_8bit: bool = False,
        direction: Literal["forward", "reverse"] = "forward",
    ):
        super().__init__()
        if not (kl_weight >= 0 and math.isfinite(kl_weight)):
            raise ValueError(f"ASFT.kl_weight must be a finite number >= 0, got {kl_weight}")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"ASFT.direction must be 'forward' or 'reverse', got {direction!r}")
        self.kl_weight = float(kl_weight)
        self.reference_name = reference
        self.reference_dtype = reference_dtype
        self.reference_load_in_8bit = bool(reference_load_in_8bit)
        self.direction = direction
        # A plain object, not an nn.Module attribute: the reference's weights stay out of
        # parameters(), state_dict() (checkpoints) and .to() of whatever module holds this one.
        self._frozen: FrozenReference | None = None

    why_no_alpha = "DFT's gradient is fixed at that of -p and the KL anchor has no alpha"

    @property
    def requires(self) -> StatsRequest:
        return StatsRequest(reference=True, kl=self.direction)

    @property
    def reference(self) -> FrozenReference | None:
        return self._frozen

    def bind_reference(self, reference: FrozenReference) -> FrozenReference:
        """Attach the frozen reference (``SFTModule`` loads it with
        :func:`bnll_lightning.reference.load_reference` at construction); the first one bound stays."""
        if self._frozen is None:
            self._frozen = reference
        return self._frozen

    def from_logprobs(self, logp: Tensor, mask: Tensor, weights: Tensor | None = None) -> ObjectiveOutput:
        raise self._missing("KL divergence to the reference model")

    def from_stats(self, stats: TokenStats) -> ObjectiveOutput:
        if stats.kl is None:
            raise self._missing("KL divergence to the reference model")
        logp = stats.logp.masked_fill(~stats.mask, -1.0)
        dft = -logp.detach().exp() * logp
        return self._reduce(dft + self.kl_weight * stats.kl, stats.mask, stats.weights)

    def tag_args(self) -> dict[str, object]:
        return {"kl": self.kl_weight}


class TokenAlpha(AlphaFamily):
    """The f_alpha family with a per-token alpha: alpha_t = alpha * smoothstep(t_t),
    t_t = (log x_t - log low) / (log high - log low) clamped to [0, 1], smoothstep(t) = 3t^2 - 2t^3.

    x_t is the token's confidence, detached: its own p (``signal: p``), or exp(-H_t), the inverse
    perplexity of the model's whole next-token distribution at that position (``signal:
    entropy``; in [1/V, 1], 1 when the model is certain, whatever the target). So alpha_t is 0
    (NLL) at or below ``low``, ``alpha`` at or above ``high``, monotone and C^1 in between: within
    one sequence, tokens the model finds unlikely train as NLL and confident ones lean on the
    prior, the paper's continuum applied token by token. This is the idea of DEFT (arXiv
    2602.11424), which maps the Renyi-2 entropy through a Cayley transform to alpha in [0, 1]; the
    map here is ``AdaptiveAlpha``'s smoothstep in log space, so the same thresholds read the same.
    A token with alpha_t = 0 gets exactly -log p.

    Works with ``AdaptiveAlpha`` (and the schedules): the controller sets ``alpha``, the ceiling,
    from the step's mean p; the map spreads it over the tokens.

    Args:
        alpha: Ceiling alpha_t at x >= ``high``, >= 0. 0 is NLL on every token; 1 gives -p on the
            confident tokens.
        signal: ``p`` (the target token's probability; needs nothing but log p) or ``entropy``
            (exp(-H); needs the streamed entropy, one extra pass over each chunk's logits).
        low: Confidence at or below which alpha_t = 0, 0 < low < high (the paper's "NLL below 0.1").
        high: Confidence at or above which alpha_t = ``alpha``, low < high < 1.
    """

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        signal: Literal["p", "entropy"] = "p",
        low: OpenUnitInterval = 0.1,
        high: OpenUnitInterval = 0.55,
    ):
        super().__init__(alpha)
        if signal not in ("p", "entropy"):
            raise ValueError(f"TokenAlpha.signal must be 'p' or 'entropy', got {signal!r}")
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"TokenAlpha needs 0 < low < high < 1, got low={low}, high={high}")
        self.signal, self.low, self.high = signal, float(low), float(high)
        self._log_low, self._log_span = math.log(low), math.log(high) - math.log(low)

    @property
    def requires(self) -> StatsRequest:
        return StatsRequest(entropy=self.signal == "entropy")

    def token_alpha(self, log_confidence: Tensor) -> Tensor:
        """alpha_t from log x_t (log p, or -H): the map in the class docstring, detached."""
        t = ((log_confidence.detach() - self._log_low) / self._log_span).clamp(0.0, 1.0)
        return self._alpha * t * t * (3.0 - 2.0 * t)

    @staticmethod
    def _f(logp: Tensor, a: Tensor) -> Tensor:
        """-expm1(a log p) / a, and exactly -log p where a == 0."""
        safe = torch.where(a > 0, a, 1.0)
        return torch.where(a > 0, -torch.expm1(safe * logp) / safe, -logp)

    def per_token(self, logp: Tensor) -> Tensor:
        if self.signal != "p":
            raise self._missing("entropy")
        return self._f(logp, self.token_alpha(logp))

    def from_stats(self, stats: TokenStats) -> ObjectiveOutput:
        if self.signal == "p":
            return self.from_logprobs(stats.logp, stats.mask, stats.weights)
        if stats.entropy is None:
            raise self._missing("entropy")
        logp = stats.logp.masked_fill(~stats.mask, -1.0)
        return self._reduce(self._f(logp, self.token_alpha(-stats.entropy)), stats.mask, stats.weights)

    def f(self, p: Tensor) -> Tensor:
        return self.per_token(torch.log(p))

    def gradient_weight(self, p: Tensor) -> Tensor:
        """p^alpha_t (1 - p) with alpha_t = alpha_t(p) held fixed (it is detached); signal ``p`` only."""
        if self.signal != "p":
            raise self._missing("entropy")
        return p.pow(self.token_alpha(torch.log(p))) * (1 - p)

    def tag_args(self) -> dict[str, object]:
        return {"alpha": self._alpha, "signal": self.signal}
