"""α controllers: where on the NLL ↔ prior-leaning continuum the objective sits, step by step.

The objective family is f_α(p) = (1 − p^α)/α with p the model's probability of the reference
token: α → 0 is NLL, α = 1 is −p, large α leans on the prior. Its gradient weight is
p^α(1 − p), i.e. NLL's weight (1 − p) times exp(α·log p). Which α wins depends on where the
model sits on the model-capability continuum (arXiv 2510.00526): high mean token probability
(≈ 0.8, model-strong) favours prior-leaning α ≥ 1, very low (≈ 0.01, model-weak) favours NLL;
the paper's diagnostic is "prior-leaning above 0.5, NLL below 0.1".

This module is plain Python + torch (no Lightning import), so it can be unit-tested and reused.

Controllers
-----------
Every controller is an :class:`AlphaController`. The trainer calls ``update(value)`` exactly
once per *optimizer* step (after gradient accumulation), with the per-step statistic of p named
by ``controller.statistic`` (see :func:`step_statistic` / :func:`finalize_statistic`), and uses
the returned α for the next step. ``state_dict()`` / ``load_state_dict()`` hold plain Python
scalars, so they fit in a Lightning checkpoint and a resumed run continues the same α trajectory.

* :class:`ConstantAlpha` — fixed α.
* :class:`LinearAlpha`, :class:`CosineAlpha` — pure functions of the step count
  (``alpha_at(step)``); the fed statistic is ignored.
* :class:`AdaptiveAlpha` — EMA of the fed statistic, mapped to a target α by a smoothstep in
  log p, approached at a bounded rate.
* :class:`PlateauAlpha` — ``AdaptiveAlpha`` until a validation metric stops improving, then back to the
  best validation's weights and α steps towards the prior (``ReduceLROnPlateau`` for α); without enough
  validations it runs as ``AdaptiveAlpha``.

Call ``update`` on *every* optimizer step, also when the step had no target tokens (pass
``None``, which is what :func:`finalize_statistic` returns then): schedules count calls, so
skipping calls would desynchronise them from the global step; adaptive controllers ignore
``None`` / non-finite values and leave their state untouched.
"""

import math
import warnings
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from bnll_lightning.constraints import (
    ClosedUnitInterval,
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    UnitIntervalClosedOpen,
)

__all__ = [
    "STATISTICS",
    "AlphaController",
    "ConstantAlpha",
    "LinearAlpha",
    "CosineAlpha",
    "AdaptiveAlpha",
    "PlateauAlpha",
    "step_statistic",
    "finalize_statistic",
]

Statistic = Literal["mean", "geometric", "quantile"]
STATISTICS: tuple[str, ...] = ("mean", "geometric", "quantile")

# Fed probabilities may overshoot [0, 1] by float32 rounding (a sum of p divided by a count);
# anything further out is a bug upstream and raises instead of being silently clamped.
_P_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- validation


def _check_finite_nonneg(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {name}={value!r}")
    return value


def _check_statistic(owner: str, statistic: str, quantile: float) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"{owner}: statistic must be one of {STATISTICS}, got statistic={statistic!r}")
    q = float(quantile)
    if not (0.0 < q < 1.0):  # also rejects nan
        raise ValueError(f"{owner}: quantile must satisfy 0 < quantile < 1, got quantile={quantile!r}")


def _as_probability(value: Optional[float]) -> Optional[float]:
    """``None`` for missing / non-finite values, else the value clamped into [0, 1]."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        return None
    if value < -_P_TOLERANCE or value > 1.0 + _P_TOLERANCE:
        raise ValueError(f"fed statistic must be a probability in [0, 1], got {value!r}")
    return min(max(value, 0.0), 1.0)


# ----------------------------------------------------------------------------- base class


class AlphaController:
    """Base class: decides the α of f_α(p) = (1 − p^α)/α at every optimizer step.

    Attributes:
        statistic: which per-step statistic of p the trainer must feed to :meth:`update`:
            ``"mean"`` (arithmetic mean p, the paper's), ``"geometric"`` (exp of mean log p) or
            ``"quantile"`` (the ``quantile``-th quantile of p). Compute it with
            :func:`step_statistic` + :func:`finalize_statistic`.
        quantile: the quantile used when ``statistic == "quantile"``.
        step: number of :meth:`update` calls so far (the optimizer steps seen).
    """

    statistic: str = "mean"
    quantile: float = 0.1

    def __init__(self) -> None:
        self.step: int = 0
        self._alpha: float = 0.0

    @property
    def alpha(self) -> float:
        """The α in force now (the value the last :meth:`update` returned)."""
        return self._alpha

    def update(self, mean_p: Optional[float]) -> float:
        """Feed one optimizer step's statistic of p and return the α in force from now on.

        Args:
            mean_p: the step's statistic (named by :attr:`statistic`), or ``None`` when the step
                had no target tokens. Non-finite values are treated like ``None``.
        """
        alpha = float(self._update(mean_p, self.step + 1))  # may raise: then nothing changes
        self.step += 1
        self._alpha = alpha
        return alpha

    def _update(self, value: Optional[float], step: int) -> float:  # pragma: no cover
        """Return the α in force after update number ``step`` (1-based)."""
        raise NotImplementedError

    # -- checkpointing --------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same α trajectory; plain Python scalars only."""
        return {
            "class": type(self).__name__,
            "config": self._config(),
            "step": self.step,
            "alpha": self._alpha,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. The hyper-parameters are *not* restored (they come
        from the run's config); a mismatch with the saved ones only warns, since changing a knob
        on resume can be deliberate, but the trajectory then differs from the original run."""
        cls = state.get("class")
        if cls != type(self).__name__:
            raise ValueError(f"cannot load a {cls!r} state into {type(self).__name__}")
        saved = state.get("config", {})
        if saved != self._config():
            warnings.warn(
                f"{type(self).__name__}: resuming with config {self._config()} "
                f"different from the saved {saved}",
                stacklevel=2,
            )
        self.step = int(state["step"])
        self._alpha = float(state["alpha"])
        self._load_extra_state(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------- schedules


class ConstantAlpha(AlphaController):
    """Fixed α for the whole run (α = 0 reproduces NLL, α = 1 is −p)."""

    def __init__(self, alpha: NonNegativeFloat = 1.0) -> None:
        """
        Args:
            alpha: the α of f_α(p) used at every step, >= 0. 0 is NLL (model-weak regime),
                1 is −p, larger values lean further on the prior (model-strong regime).
        """
        super().__init__()
        # Why a knob: the paper's fixed-objective baselines (NLL, −p, α = 10) are all constants.
        self.value = _check_finite_nonneg("ConstantAlpha", "alpha", alpha)
        self._alpha = self.value

    def alpha_at(self, step: int) -> float:
        """α after ``step`` updates (constant)."""
        return self.value

    def _update(self, value: Optional[float], step: int) -> float:
        return self.value

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.value}


class _Schedule(AlphaController):
    """α as a pure function of the number of update() calls, clamped after ``steps``."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        super().__init__()
        owner = type(self).__name__
        self.start = _check_finite_nonneg(owner, "start", start)
        self.end = _check_finite_nonneg(owner, "end", end)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"{owner}: steps must be an integer >= 1, got steps={steps!r}")
        self.steps = int(steps)
        self._alpha = self.alpha_at(0)

    def _fraction(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"{type(self).__name__}: step must be >= 0, got {step!r}")
        return min(step, self.steps) / self.steps

    def alpha_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, value: Optional[float], step: int) -> float:
        # The statistic is ignored: a schedule is a function of the step only.
        return self.alpha_at(step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._alpha = self.alpha_at(self.step)  # the step is the whole state

    def _config(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps": self.steps}


class LinearAlpha(_Schedule):
    """α moves linearly from ``start`` to ``end`` over ``steps`` updates, then stays at ``end``.

    ``alpha_at(k)`` is the α in force after ``k`` calls to :meth:`update`
    (``alpha_at(0) == start`` before training, ``alpha_at(k) == end`` for ``k >= steps``).
    """

    def __init__(self, start: NonNegativeFloat = 0.0, end: NonNegativeFloat = 1.0, steps: PositiveInt = 1000) -> None:
        """
        Args:
            start: α before the first optimizer step, >= 0. Default 0 (NLL): begin where a weak
                model is best served and lean on the prior once it has learned.
            end: α reached after ``steps`` optimizer steps and kept afterwards, >= 0.
            steps: number of optimizer steps the ramp takes, >= 1; sets how fast the objective
                moves along the continuum.
        """
        super().__init__(start, end, steps)

    def alpha_at(self, step: int) -> float:
        """α after ``step`` updates; a pure function of ``step``."""
        return self.start + (self.end - self.start) * self._fraction(step)


class CosineAlpha(_Schedule):
    """Like :class:`LinearAlpha` with a half-cosine ramp (flat at both ends)."""

    def __init__(self, start: NonNegativeFloat = 0.0, end: NonNegativeFloat = 1.0, steps: PositiveInt = 1000) -> None:
        """
        Args:
            start: α before the first optimizer step, >= 0. Default 0 (NLL).
            end: α reached after ``steps`` optimizer steps and kept afterwards, >= 0.
            steps: number of optimizer steps the ramp takes, >= 1. The cosine shape changes α
                slowly at both ends, so the switch-over to ``end`` has no kink.
        """
        super().__init__(start, end, steps)

    def alpha_at(self, step: int) -> float:
        """α after ``step`` updates; a pure function of ``step``."""
        f = self._fraction(step)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))


# ----------------------------------------------------------------------------- adaptive


def _smoothstep(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


class AdaptiveAlpha(AlphaController):
    """Moves α along the continuum from a running estimate of how strong the model is.

    With the defaults: NLL while the model learns, −p once the median target token is learned (its
    batch median p passes 0.9, α = 1 from 0.99). Under label noise a model first fits the clean
    majority and only later memorises the wrong answers (the early-learning phenomenon); NLL is the
    fastest learner, −p the one that does not chase the low-p tail. The median, not the mean: the
    noisy tail pulls the mean down exactly where α should rise. Chosen on the noise study's dev task
    and reported on the others (docs/benchmarks.md, README "Which objective when").

    Per accepted update with value ``x``:

    1. **EMA, bias-corrected.** ``m ← d·m + (1−d)·x`` and ``w ← d·w + (1−d)·1``;
       ``ema = m / w`` (``d`` is ``ema_decay``). Without ``initial``, ``m = w = 0`` at
       the start, so the first EMA equals the first value and every later value gets its proper
       exponential weight (plain "initialise to the first value" over-weights the first batch
       by a factor 1/(1−d)). With ``initial`` (a probe of the base model), ``m = initial`` and
       ``w = 1``: the probe counts as a fully formed estimate and α *starts* at
       ``target(initial)`` instead of 0.
    2. **Target.** :meth:`target` maps the EMA to α with a smoothstep in log p::

           t = (log ema − log low) / (log high − log low), clamped to [0, 1]
           target = alpha_max · (3t² − 2t³)

       so target = 0 at or below ``low``, ``alpha_max`` at or above ``high``, monotone
       non-decreasing and C¹ in between. *Why log p:* α acts on the gradient weight through
       p^α = exp(α·log p), so log p is the coordinate in which α's effect is uniform; the
       continuum is also multiplicative (the paper's regimes sit at 0.01, 0.5, 0.8), and the
       geometric statistic is itself a mean of log p. With the defaults the half-way point
       (α = alpha_max/2) is at √(low·high) ≈ 0.94. *Why smoothstep:* zero slope at ``low``
       and ``high``, so EMA noise around a threshold barely moves α and there is no kink.
    3. **Rate bound.** α moves toward the target by at most ``max_delta`` per update, so one
       odd batch cannot swing the objective and α cannot oscillate faster than the bound.

    With a constant input ``p`` the EMA converges to ``p`` and α settles exactly at
    ``target(p)``; the settled α is therefore monotone in ``p``.

    ``None`` and non-finite inputs (nan / ±inf) are ignored: EMA and α keep their values (only
    :attr:`step`, the call count, advances). Finite inputs outside [0, 1] (beyond float rounding)
    raise ``ValueError``.

    Attributes:
        ema: the current EMA of the fed statistic (``None`` before any value when no
            ``initial`` was given).
        alpha_max, low, high, ema_decay, max_delta, statistic, quantile, initial: the arguments.
    """

    def __init__(
        self,
        alpha_max: NonNegativeFloat = 1.0,
        low: OpenUnitInterval = 0.9,
        high: OpenUnitInterval = 0.99,
        ema_decay: UnitIntervalClosedOpen = 0.7,
        max_delta: PositiveFloat = 0.25,
        statistic: Literal["mean", "geometric", "quantile"] = "quantile",
        quantile: OpenUnitInterval = 0.5,
        initial: Optional[ClosedUnitInterval] = None,
    ) -> None:
        """
        Args:
            alpha_max: α used when the model is strong (EMA >= ``high``), >= 0. 1 gives −p;
                larger values lean further on the prior (the paper also uses 10).
            low: EMA of the statistic at or below which α = 0 (NLL), 0 < low < high. Far above the
                paper's 0.1/0.5, which classify the *base* model (``probe`` applies them): this
                statistic is read *while training*, and NLL should keep going until the bulk of the
                target tokens is learned. Default 0.9, with the median: chosen on the noise study's
                dev task (docs/benchmarks.md).
            high: EMA of the statistic at or above which α = ``alpha_max``, low < high < 1. Default
                0.99: the median token is learned, what is left to fit is the tail (on noisy
                data, the wrong answers).
            ema_decay: decay of the exponential moving average of the fed statistic, 0 <= ema_decay < 1.
                Higher is smoother but slower to react; 0.7 averages over about 3 optimizer steps,
                so α follows the model within a short run and one odd batch still moves it little.
            max_delta: largest change of α per optimizer step, > 0. Bounds how fast the
                objective can move, so a noisy batch cannot swing it and α cannot oscillate.
                Default 0.25 (0 to 1 in 4 steps): a tighter bound, not the model, sets α's pace in
                a short run, and the controller moves like a ramp (docs/benchmarks.md).
            statistic: which per-step statistic of p the trainer feeds. "quantile": the
                ``quantile``-th quantile of p (the default, with the median); "mean" (arithmetic mean
                p, the paper's); "geometric": exp of mean log p, pulled down by the hard tokens.
                The mean and the geometric mean fall with label noise (a wrong answer has log p
                near -10), which would hold α at NLL on exactly the data that memorises; the
                median does not move until the noisy share nears half.
            quantile: the quantile used when ``statistic="quantile"``, 0 < quantile < 1.
                Default 0.5: the median target token.
            initial: optional starting value of the EMA, in [0, 1], e.g. the base model's mean
                p from a probe pass before training; α then starts at ``target(initial)``.
                ``None`` starts the EMA from the first fed value and α from 0 (NLL); with the
                default statistic leave it so: a strong base model would start past ``low`` and
                skip the NLL phase that the noise study found to matter.
        """
        super().__init__()
        owner = "AdaptiveAlpha"
        self.alpha_max = _check_finite_nonneg(owner, "alpha_max", alpha_max)
        low, high = float(low), float(high)
        if not (0.0 < low < 1.0):
            raise ValueError(f"{owner}: low must satisfy 0 < low < high < 1, got low={low!r}")
        if not (0.0 < high < 1.0):
            raise ValueError(f"{owner}: high must satisfy 0 < low < high < 1, got high={high!r}")
        if not low < high:
            raise ValueError(
                f"{owner}: low must be < high (0 < low < high < 1), got low={low!r}, high={high!r}"
            )
        self.low, self.high = low, high
        decay = float(ema_decay)
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"{owner}: ema_decay must satisfy 0 <= ema_decay < 1, got ema_decay={ema_decay!r}")
        self.ema_decay = decay
        max_delta = float(max_delta)
        if not (math.isfinite(max_delta) and max_delta > 0.0):
            raise ValueError(f"{owner}: max_delta must be > 0, got max_delta={max_delta!r}")
        self.max_delta = max_delta
        _check_statistic(owner, statistic, quantile)
        self.statistic = statistic
        self.quantile = float(quantile)
        if initial is not None:
            initial = float(initial)
            if not (0.0 <= initial <= 1.0):
                raise ValueError(f"{owner}: initial must be in [0, 1] or None, got initial={initial!r}")
        self.initial = initial

        # EMA accumulator m and its total weight w (ema = m / w); see the class docstring.
        self._m = 0.0 if initial is None else initial
        self._w = 0.0 if initial is None else 1.0
        self.n_observed = 0  # accepted (finite) values
        self._alpha = 0.0 if initial is None else self.target(initial)

    @property
    def ema(self) -> Optional[float]:
        """Current EMA of the fed statistic; ``None`` before any value (and no ``initial``)."""
        return self._m / self._w if self._w > 0.0 else None

    def start(self, value: float) -> float:
        """Start from ``value`` (e.g. the base model's statistic measured by a probe pass) after
        construction, exactly as ``initial=value`` would have: the EMA becomes ``value`` with
        full weight and α becomes ``target(value)``. Only before the first :meth:`update`.

        The start lives in the state (EMA accumulator and α), not in the config: ``initial`` is
        left as given, so a run resumed from a checkpoint continues the same trajectory without
        a config-mismatch warning. Returns the α now in force.
        """
        if self.step or self.n_observed:
            raise RuntimeError("AdaptiveAlpha.start() must be called before the first update()")
        value = float(value)
        if not (0.0 <= value <= 1.0):  # also rejects nan
            raise ValueError(f"AdaptiveAlpha.start: value must be in [0, 1], got {value!r}")
        self._m, self._w = value, 1.0
        self._alpha = self.target(value)
        return self._alpha

    def target(self, ema: float) -> float:
        """α the controller heads for at EMA ``ema``: ``alpha_max``·smoothstep in log p between
        ``low`` (→ 0) and ``high`` (→ ``alpha_max``); monotone non-decreasing in ``ema``."""
        ema = float(ema)
        if math.isnan(ema):
            raise ValueError("target: ema must not be nan")
        if ema <= self.low:
            return 0.0
        if ema >= self.high:
            return self.alpha_max
        t = (math.log(ema) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return self.alpha_max * _smoothstep(t)

    def _update(self, value: Optional[float], step: int) -> float:
        x = _as_probability(value)
        if x is None:  # no tokens this step, or a non-finite statistic: keep the state
            return self._alpha
        d = self.ema_decay
        self._m = d * self._m + (1.0 - d) * x
        self._w = d * self._w + (1.0 - d)
        self.n_observed += 1
        delta = min(max(self._goal() - self._alpha, -self.max_delta), self.max_delta)
        return self._alpha + delta

    def _goal(self) -> float:
        """The α this step heads for (at most ``max_delta`` away from the current one)."""
        return self.target(self._m / self._w)

    def _config(self) -> dict[str, Any]:
        return {
            "alpha_max": self.alpha_max,
            "low": self.low,
            "high": self.high,
            "ema_decay": self.ema_decay,
            "max_delta": self.max_delta,
            "statistic": self.statistic,
            "quantile": self.quantile,
            "initial": self.initial,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"ema_m": self._m, "ema_w": self._w, "n_observed": self.n_observed}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._m = float(state["ema_m"])
        self._w = float(state["ema_w"])
        self.n_observed = int(state["n_observed"])


# ----------------------------------------------------------------------------- validation-aware

PlateauMode = Literal["validation", "fallback"]


class PlateauAlpha(AdaptiveAlpha):
    """Until validation stops improving, v3; then the best weights back and α up: ``ReduceLROnPlateau`` for α.

    Under label noise a model first learns the clean majority, then memorises the wrong answers; a
    metric of held-out rows of the same (noisy) data turns when the memorising starts. That is the
    signal early stopping reads to *stop*. This controller reads it to keep training with an
    objective that no longer chases the low-p tail: after ``patience`` validations without an
    improvement of at least ``min_delta``, the validation level of α rises by ``alpha_step`` (at most
    ``alpha_max``), and α moves there at ``max_delta`` per optimizer step.

    **The defaults are the design the dev task chose** (issue 27; docs/benchmarks.md): the mean p of
    the validation targets (``val/mean_p``, higher is better: a held-out noisy label cannot be
    learned, so it moves with the clean ones, where ``val/nll`` charges a model for not believing the
    noisy labels), v3's α before a rise (``before_rise="adaptive"``), and ``restore_best``. The first
    design, NLL until ``val/nll`` misses, is ``monitor="val/nll", mode="min", restore_best=False,
    before_rise="nll"``.

    **It never moves back.** A rise follows memorising, which does not undo itself; a return to NLL
    would resume it, and a validation loss that improves after the rise is evidence for the new α.

    **A rise comes late; ``restore_best`` takes it back.** The validation that misses comes after the
    steps that memorised, and a higher α from then on cannot unlearn them. With ``restore_best`` each
    rise also puts the weights back to the best validation's (the checkpoint that a ``ModelCheckpoint``
    with the same ``monitor`` and ``mode`` kept), and training goes on from there with the new α: early
    stopping's checkpoint, then more learning from the clean majority instead of a stop.

    **Too few validations.** At the start of fit the trainer says how many validations the run will
    have (:meth:`plan`); with fewer than ``patience + 2`` (a best to beat, then ``patience + 1``
    misses) the signal cannot act, and the controller runs as :class:`AdaptiveAlpha` with its own
    knobs (the v3 default: NLL until the median token is learned) and warns once. The mode is state:
    a resumed run keeps it.

    The trainer feeds one value per validation with :meth:`validate` (``bnll_lightning.plateau``'s
    callback reads ``monitor`` from the logged metrics; the sanity check is not fed) and the per-step
    statistic with :meth:`update`, as for ``AdaptiveAlpha`` (kept for the fallback and for logging).
    """

    def __init__(
        self,
        alpha_max: NonNegativeFloat = 1.0,
        alpha_step: PositiveFloat = 1.0,
        patience: int = 0,
        min_delta: NonNegativeFloat = 0.0,
        monitor: str = "val/mean_p",
        mode: Literal["min", "max"] = "max",
        max_delta: PositiveFloat = 0.25,
        low: OpenUnitInterval = 0.9,
        high: OpenUnitInterval = 0.99,
        ema_decay: UnitIntervalClosedOpen = 0.7,
        statistic: Literal["mean", "geometric", "quantile"] = "quantile",
        quantile: OpenUnitInterval = 0.5,
        restore_best: bool = True,
        before_rise: Literal["nll", "adaptive"] = "adaptive",
    ) -> None:
        """
        Args:
            alpha_max: the highest α, >= 0. 1 gives −p.
            alpha_step: how far one plateau raises α's validation level, > 0. The default 1.0 goes from
                NLL to −p at the first plateau: a short run rarely validates often enough for two.
            patience: validations without improvement tolerated before α rises, >= 0 (as
                ``ReduceLROnPlateau``). 0: the first validation that does not beat the best raises it;
                a noisy split's metric turns within an epoch of the memorising.
            min_delta: the smallest change of ``monitor`` that counts as an improvement, >= 0. With
                ``restore_best`` the weights restored are the ``ModelCheckpoint``'s best, which counts any
                improvement: above 0, a rise may restore a validation this controller did not count as a best.
            monitor: the logged metric read at each validation (``val/mean_p``: the held-out targets' mean
                p; ``val/nll``, their NLL, is what ``EarlyStopping`` users monitor by default).
            mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` if higher.
            max_delta: largest change of α per optimizer step, > 0 (a rise ramps over a few steps).
            low, high, ema_decay, statistic, quantile: the :class:`AdaptiveAlpha` knobs, used when the run
                has too few validations (defaults: v3).
            restore_best: at each rise, also load the weights of the best validation so far from the
                ``ModelCheckpoint`` that monitors ``monitor`` in ``mode`` (the run must have one; single
                device or DDP; ``configs/objectives/plateau.yaml`` adds it). Optimizer state and the step
                count go on.
            before_rise: α between rises. ``"nll"``: the validation level only (0 until the first rise).
                ``"adaptive"``: the higher of that level and the :class:`AdaptiveAlpha` target (the v3 knobs),
                so a model that is strong from the start leans on the prior before any validation says so.
        """
        super().__init__(alpha_max=alpha_max, low=low, high=high, ema_decay=ema_decay, max_delta=max_delta,
                         statistic=statistic, quantile=quantile)  # fmt: skip
        owner = "PlateauAlpha"
        step = float(alpha_step)
        if not (math.isfinite(step) and step > 0.0):
            raise ValueError(f"{owner}: alpha_step must be > 0, got alpha_step={alpha_step!r}")
        if isinstance(patience, bool) or int(patience) != patience or patience < 0:
            raise ValueError(f"{owner}: patience must be an integer >= 0, got patience={patience!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"{owner}: mode must be 'min' or 'max', got mode={mode!r}")
        if not monitor:
            raise ValueError(f"{owner}: monitor must name a logged metric, e.g. 'val/nll'")
        self.alpha_step, self.patience = step, int(patience)
        self.min_delta = _check_finite_nonneg(owner, "min_delta", min_delta)
        self.monitor, self.mode = monitor, mode
        self.restore_best = bool(restore_best)
        if before_rise not in ("nll", "adaptive"):
            raise ValueError(f"{owner}: before_rise must be 'nll' or 'adaptive', got before_rise={before_rise!r}")
        self.before_rise = before_rise
        self.run_mode: Optional[str] = None  # "validation" or "fallback", decided by plan()
        self.best: Optional[float] = None
        self.misses = 0  # validations since the best
        self.level = 0.0  # α the validations have set
        self.validations = 0
        self.rises: list[int] = []  # the optimizer step of each rise
        self.restored: list[int] = []  # restore_best: the optimizer step at which each restore happened

    @property
    def min_validations(self) -> int:
        """Validations a run needs for the signal to act: a best, then ``patience + 1`` misses."""
        return self.patience + 2

    def plan(self, validations: int) -> str:
        """Decide the mode from the run's planned validations (once; a resumed run keeps its mode)."""
        if self.run_mode is None:
            self.run_mode = "validation" if validations >= self.min_validations else "fallback"
            if self.run_mode == "fallback":
                warnings.warn(
                    f"PlateauAlpha: this run validates {validations} time(s), fewer than the {self.min_validations}"
                    " its patience needs; alpha follows AdaptiveAlpha (NLL until the median token p passes"
                    f" {self.low}). Validate more often (trainer.val_check_interval) for the validation signal.",
                    stacklevel=2,
                )
        return self.run_mode

    def validate(self, value: float) -> float:
        """Feed one validation's ``monitor``; returns α's validation level (unchanged in fallback mode)."""
        value = float(value.item() if isinstance(value, Tensor) else value)
        if self.run_mode == "fallback" or not math.isfinite(value):
            return self.level
        self.validations += 1
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if better:
            self.best, self.misses = value, 0
        else:
            self.misses += 1
            if self.misses > self.patience and self.level < self.alpha_max:
                self.level = min(self.level + self.alpha_step, self.alpha_max)
                self.misses = 0
                self.rises.append(self.step)
        return self.level

    def start(self, value: float) -> float:
        raise RuntimeError("PlateauAlpha starts at NLL and moves on validation: warm_start_batches is for AdaptiveAlpha")

    def _goal(self) -> float:
        if self.run_mode == "fallback":
            return super()._goal()
        return max(self.level, super()._goal()) if self.before_rise == "adaptive" else self.level

    def _config(self) -> dict[str, Any]:
        return {
            "alpha_max": self.alpha_max, "alpha_step": self.alpha_step, "patience": self.patience,
            "min_delta": self.min_delta, "monitor": self.monitor, "mode": self.mode, "max_delta": self.max_delta,
            "low": self.low, "high": self.high, "ema_decay": self.ema_decay, "statistic": self.statistic,
            "quantile": self.quantile, "restore_best": self.restore_best, "before_rise": self.before_rise,
        }  # fmt: skip

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "run_mode": self.run_mode, "best": self.best, "misses": self.misses,
                "level": self.level, "validations": self.validations, "rises": list(self.rises),
                "restored": list(self.restored)}  # fmt: skip

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.run_mode, self.best = state["run_mode"], state["best"]
        self.misses, self.level = int(state["misses"]), float(state["level"])
        self.validations, self.rises = int(state["validations"]), [int(s) for s in state["rises"]]
        self.restored = [int(s) for s in state.get("restored", [])]


# ----------------------------------------------------------------------------- statistics


@torch.no_grad()
def step_statistic(
    logp: Tensor, mask: Tensor, statistic: str = "mean", quantile: float = 0.1, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Summable (numerator, denominator) of one micro-batch's statistic of p = exp(logp).

    Both are detached float32 0-dim tensors on ``logp``'s device. Sum them over the
    micro-batches of an optimizer step and over DDP ranks (e.g. ``all_reduce(SUM)``), then call
    :func:`finalize_statistic`; the result is token-weighted.

    * ``"mean"``: (Σ p, n) — arithmetic mean p.
    * ``"geometric"``: (Σ log p, n) — :func:`finalize_statistic` applies exp.
    * ``"quantile"``: (q̂·n, n) with q̂ the micro-batch's ``quantile``-th quantile of p (linear
      interpolation, as ``torch.quantile``). **Approximation:** after summing, this is the
      token-weighted average of per-micro-batch quantiles, not the quantile of all the step's
      tokens; it is exact for one micro-batch on one rank.

    With ``weights`` (each token's row weight) every token counts by its weight: exact for the mean
    and the geometric mean; ``quantile`` takes the tokens of weight > 0 and weighs the micro-batch's
    quantile by their summed weight (what the token count stands for without weights).

    Positions where ``mask`` is false contribute nothing, whatever ``logp`` holds there
    (padding may be -inf or nan). An all-false mask gives (0, 0), never nan. No host sync.

    Args:
        logp: log-probabilities of the reference tokens, any shape, any float dtype.
        mask: same shape; true (non-zero) where the token is a training target.
        statistic: "mean", "geometric" or "quantile".
        quantile: the quantile for ``statistic="quantile"``, 0 < quantile < 1.
        weights: optional, same shape: each token's weight (>= 0); None counts every token once.
    """
    _check_statistic("step_statistic", statistic, quantile)
    if logp.shape != mask.shape:
        raise ValueError(f"step_statistic: logp shape {tuple(logp.shape)} != mask shape {tuple(mask.shape)}")
    if weights is not None:
        w = torch.where(mask != 0, weights.detach().float(), 0.0)
        if statistic == "quantile":
            num, den = step_statistic(logp, w > 0, statistic, quantile)
            return num / den.clamp_min(1.0) * w.sum(), w.sum()
        x = logp.detach().float()
        return (torch.where(mask != 0, x.exp() if statistic == "mean" else x, 0.0) * w).sum(), w.sum()
    lp = logp.detach().float().reshape(-1)
    m = mask.detach().reshape(-1) != 0
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    den = m.sum(dtype=torch.float32)
    if statistic == "mean":
        num = torch.where(m, lp.exp(), zero).sum()
    elif statistic == "geometric":
        num = torch.where(m, lp, zero).sum()
    else:
        # Masked-out positions sort to the end (p <= 1 < 2); interpolate among the first n.
        p = torch.where(m, lp.exp(), torch.full_like(lp, 2.0)).sort().values
        if p.numel() == 0:
            return zero.clone(), den
        pos = quantile * (den - 1.0).clamp_min(0.0)
        lo = pos.floor()
        hi = torch.minimum(lo + 1.0, (den - 1.0).clamp_min(0.0))
        p_lo = p[lo.long()]
        p_hi = p[hi.long()]
        q_value = p_lo + (pos - lo) * (p_hi - p_lo)
        num = torch.where(den > 0, q_value * den, zero)
    return num.reshape(()), den.reshape(())


def finalize_statistic(
    num: Union[Tensor, float], den: Union[Tensor, float], statistic: str = "mean"
) -> Optional[float]:
    """Turn summed (numerator, denominator) from :func:`step_statistic` into the value to feed
    :meth:`AlphaController.update`.

    Returns ``num/den`` ("mean", "quantile") or ``exp(num/den)`` ("geometric"), or ``None`` when
    ``den <= 0`` (the step had no target tokens) or the result is not finite. Pass the result to
    ``update()`` as is: adaptive controllers ignore ``None``, schedules still count the step.
    Calls ``.item()`` (one host sync per optimizer step).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"finalize_statistic: statistic must be one of {STATISTICS}, got {statistic!r}")
    num_f = float(num.item() if isinstance(num, Tensor) else num)
    den_f = float(den.item() if isinstance(den, Tensor) else den)
    if not (den_f > 0.0) or not math.isfinite(den_f):
        return None
    value = num_f / den_f
    if statistic == "geometric":
        value = math.exp(value) if value < 700 else math.inf
    if not math.isfinite(value):
        return None
    return value
