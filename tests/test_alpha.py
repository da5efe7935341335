"""Tests for bnll_lightning.alpha: α controllers and the per-step statistic of p."""

import math
import random

import pytest
import torch

from bnll_lightning.alpha import (
    AdaptiveAlpha,
    AlphaController,
    ConstantAlpha,
    CosineAlpha,
    LinearAlpha,
    finalize_statistic,
    step_statistic,
)

ALL_CONTROLLERS = [
    lambda: ConstantAlpha(0.7),
    lambda: LinearAlpha(0.0, 2.0, steps=17),
    lambda: CosineAlpha(1.0, 0.0, steps=13),
    lambda: AdaptiveAlpha(),
    lambda: AdaptiveAlpha(alpha_max=10.0, statistic="geometric", initial=0.3),
    lambda: AdaptiveAlpha(statistic="quantile", quantile=0.2, ema_decay=0.0),
]


def noisy_stream(n, seed=0, nan_every=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if nan_every and i % nan_every == 3:
            out.append(rng.choice([float("nan"), float("inf"), None]))
        else:
            out.append(rng.random())
    return out


def settle(ctrl, p, n=600):
    for _ in range(n):
        ctrl.update(p)
    return ctrl.alpha


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("make", ALL_CONTROLLERS)
def test_contract(make):
    c = make()
    assert isinstance(c, AlphaController)
    assert c.statistic in ("mean", "geometric", "quantile")
    assert 0.0 < c.quantile < 1.0
    a = c.update(0.5)
    assert isinstance(a, float) and a == c.alpha
    assert c.step == 1
    sd = c.state_dict()
    assert isinstance(sd, dict)
    # plain scalars only: fits a Lightning checkpoint loaded with weights_only=True
    flat = list(sd.values()) + list(sd["config"].values())
    assert all(v is None or isinstance(v, (int, float, str, dict)) for v in flat)


@pytest.mark.parametrize("make", ALL_CONTROLLERS)
def test_state_dict_round_trip_mid_way(make):
    stream = noisy_stream(120, seed=1)
    ref = make()
    ref_alphas = [ref.update(x) for x in stream]

    first = make()
    for x in stream[:50]:
        first.update(x)
    restored = make()
    restored.load_state_dict(first.state_dict())
    assert restored.alpha == first.alpha
    assert restored.step == 50
    resumed = [restored.update(x) for x in stream[50:]]
    assert resumed == ref_alphas[50:]  # bit-identical trajectory
    assert restored.state_dict() == ref.state_dict()


def test_load_state_dict_rejects_other_class():
    with pytest.raises(ValueError, match="LinearAlpha"):
        AdaptiveAlpha().load_state_dict(LinearAlpha().state_dict())


def test_load_state_dict_warns_on_changed_config():
    sd = AdaptiveAlpha(alpha_max=1.0).state_dict()
    with pytest.warns(UserWarning, match="config"):
        AdaptiveAlpha(alpha_max=2.0).load_state_dict(sd)


# ----------------------------------------------------------------------------- schedules


def test_constant_alpha():
    c = ConstantAlpha(0.3)
    assert c.alpha == 0.3
    assert [c.update(x) for x in (0.1, float("nan"), None, 0.9)] == [0.3] * 4
    assert ConstantAlpha().alpha == 1.0
    assert ConstantAlpha(0.0).alpha == 0.0


def test_linear_alpha_at_is_pure_and_clamped():
    s = LinearAlpha(start=0.0, end=1.0, steps=10)
    assert s.alpha == 0.0
    assert s.alpha_at(0) == 0.0
    assert s.alpha_at(5) == pytest.approx(0.5)
    assert s.alpha_at(10) == 1.0
    assert s.alpha_at(11) == 1.0 and s.alpha_at(10**6) == 1.0
    # pure: querying does not advance or change anything
    before = s.state_dict()
    for k in (7, 3, 7):
        s.alpha_at(k)
    assert s.state_dict() == before and s.step == 0 and s.alpha == 0.0
    assert s.alpha_at(7) == s.alpha_at(7) == pytest.approx(0.7)


def test_linear_update_follows_alpha_at_and_ignores_statistic():
    s = LinearAlpha(start=2.0, end=0.5, steps=4)  # decreasing works too
    got = [s.update(x) for x in (0.9, None, float("nan"), 0.01, 0.5, 0.5)]
    assert got == [s.alpha_at(k) for k in range(1, 7)]
    assert got[3:] == [0.5, 0.5, 0.5]
    assert got[0] == pytest.approx(2.0 - 1.5 / 4)


def test_linear_resumed_continues():
    a = LinearAlpha(0.0, 1.0, steps=20)
    for _ in range(8):
        a.update(0.5)
    b = LinearAlpha(0.0, 1.0, steps=20)
    b.load_state_dict(a.state_dict())
    assert b.alpha == pytest.approx(0.4)
    assert [b.update(0.5) for _ in range(15)] == [a.update(0.5) for _ in range(15)]
    assert b.alpha == 1.0


def test_cosine_alpha():
    s = CosineAlpha(start=0.0, end=2.0, steps=10)
    assert s.alpha_at(0) == pytest.approx(0.0)
    assert s.alpha_at(5) == pytest.approx(1.0)
    assert s.alpha_at(10) == pytest.approx(2.0) and s.alpha_at(50) == pytest.approx(2.0)
    vals = [s.alpha_at(k) for k in range(11)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[1] - vals[0] < vals[5] - vals[4]  # flat at the start


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ConstantAlpha(-0.1), "alpha"),
        (lambda: ConstantAlpha(float("nan")), "alpha"),
        (lambda: LinearAlpha(start=-1.0), "start"),
        (lambda: LinearAlpha(end=float("inf")), "end"),
        (lambda: LinearAlpha(steps=0), "steps"),
        (lambda: CosineAlpha(steps=2.5), "steps"),
    ],
)
def test_schedule_validation(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_schedule_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        LinearAlpha().alpha_at(-1)


# ----------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha_max": -1.0}, "alpha_max"),
        ({"alpha_max": float("nan")}, "alpha_max"),
        ({"low": 0.0}, "low"),
        ({"low": -0.1}, "low"),
        ({"high": 1.0}, "high"),
        ({"low": 0.6, "high": 0.5}, "low"),
        ({"low": 0.5, "high": 0.5}, "high"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"max_delta": 0.0}, "max_delta"),
        ({"max_delta": -0.1}, "max_delta"),
        ({"quantile": 0.0}, "quantile"),
        ({"quantile": 1.0}, "quantile"),
        ({"statistic": "median"}, "statistic"),
        ({"initial": 1.5}, "initial"),
    ],
)
def test_adaptive_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveAlpha(**kwargs)


def test_adaptive_accepts_edge_values():
    AdaptiveAlpha(alpha_max=0.0, ema_decay=0.0, initial=0.0)
    AdaptiveAlpha(low=0.01, high=0.99, initial=1.0, statistic="quantile", quantile=0.5)


@pytest.mark.parametrize("alpha_max", [1.0, 10.0, 0.5])
def test_adaptive_settle_thresholds(alpha_max):
    # The defaults: NLL while the median token is still being learned, alpha_max once it is.
    for learning in (0.02, 0.5, 0.9):
        assert settle(AdaptiveAlpha(alpha_max=alpha_max), learning) <= 0.1 * alpha_max
    strong = AdaptiveAlpha(alpha_max=alpha_max)
    assert settle(strong, 0.995, n=2000) >= 0.9 * alpha_max
    # and from the opposite end: a strong start falls back when the model looks weak
    came_down = AdaptiveAlpha(alpha_max=alpha_max, initial=0.995)
    assert came_down.alpha == alpha_max
    assert settle(came_down, 0.02, n=2000) <= 0.1


def test_adaptive_settled_alpha_monotone_in_p():
    grid = [i / 1000 for i in range(1, 1000)]
    settled = [settle(AdaptiveAlpha(alpha_max=1.0), p) for p in grid]
    assert all(b >= a - 1e-12 for a, b in zip(settled, settled[1:]))
    assert settled[0] == 0.0 and settled[-1] == pytest.approx(1.0)
    assert len(set(round(a, 6) for a in settled)) > 10  # actually moves in between
    # settled value is exactly the documented target
    for p in (0.92, 0.95, 0.97):
        c = AdaptiveAlpha()
        assert settle(c, p) == pytest.approx(c.target(p), abs=1e-9)


@pytest.mark.parametrize("max_delta", [0.05, 0.01, 0.3])
def test_adaptive_rate_bound(max_delta):
    c = AdaptiveAlpha(alpha_max=10.0, max_delta=max_delta, ema_decay=0.0)  # decay 0: target jumps freely
    rng = random.Random(2)
    prev = c.alpha
    moved = 0.0
    for i in range(400):
        x = rng.choice([0.001, 0.99]) if i % 3 else rng.random()
        a = c.update(x)
        assert abs(a - prev) <= max_delta + 1e-12
        moved = max(moved, abs(a - prev))
        prev = a
    assert moved == pytest.approx(max_delta)  # the bound is actually hit


def test_adaptive_target_mapping():
    c = AdaptiveAlpha(alpha_max=2.0, low=0.1, high=0.55)
    assert c.target(0.0) == 0.0 and c.target(0.05) == 0.0 and c.target(0.1) == 0.0
    assert c.target(0.55) == 2.0 and c.target(0.9) == 2.0 and c.target(1.0) == 2.0
    # smoothstep in log p: half-way at the geometric mean of low and high
    assert c.target(math.sqrt(0.1 * 0.55)) == pytest.approx(1.0)
    xs = [0.1 + i * 0.45 / 1000 for i in range(1001)]
    ys = [c.target(x) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:]))
    assert max(abs(b - a) for a, b in zip(ys, ys[1:])) < 0.02  # continuous, no jump
    # C1: flat at both ends
    assert c.target(0.1 * 1.001) < 1e-4 and 2.0 - c.target(0.55 / 1.001) < 1e-4


def test_adaptive_ema_bias_corrected_and_initial():
    c = AdaptiveAlpha(ema_decay=0.9)
    assert c.ema is None and c.alpha == 0.0
    c.update(0.4)
    assert c.ema == pytest.approx(0.4)  # first value, not 0.04
    c.update(0.2)
    assert c.ema == pytest.approx((0.9 * 0.1 * 0.4 + 0.1 * 0.2) / (0.9 * 0.1 + 0.1))

    probe = AdaptiveAlpha(ema_decay=0.9, initial=0.8, alpha_max=3.0, low=0.1, high=0.55)
    assert probe.ema == 0.8 and probe.alpha == 3.0
    probe.update(0.0)
    assert probe.ema == pytest.approx(0.72)  # the probe counts as a full estimate
    assert probe.alpha == 3.0  # target(0.72) is still alpha_max


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None, torch.tensor(float("nan"))])
def test_adaptive_ignores_non_finite(bad):
    c = AdaptiveAlpha(ema_decay=0.5)
    for x in (0.3, 0.6, 0.7):
        c.update(x)
    before = c.state_dict()
    a = c.update(bad)
    after = c.state_dict()
    assert a == before["alpha"] and math.isfinite(c.ema)
    assert after.pop("step") == before.pop("step") + 1
    assert after == before
    assert c.update(0.7) >= a  # keeps working


def test_adaptive_non_finite_first_value():
    c = AdaptiveAlpha()
    assert c.update(float("nan")) == 0.0 and c.ema is None
    c.update(0.3)
    assert c.ema == pytest.approx(0.3)


def test_adaptive_rejects_out_of_range_without_changing_state():
    c = AdaptiveAlpha()
    c.update(0.5)
    before = c.state_dict()
    with pytest.raises(ValueError, match="probability"):
        c.update(1.5)
    assert c.state_dict() == before
    c.update(1.0 + 1e-7)  # float rounding of a mean is tolerated (clamped)
    assert c.ema <= 1.0


# ----------------------------------------------------------------------------- statistics


def _lp(ps):
    return torch.tensor(ps, dtype=torch.float64).log().float()


def test_step_statistic_mean_and_geometric():
    logp = _lp([[0.5, 0.25, 0.9], [0.1, 0.8, 0.3]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    num, den = step_statistic(logp, mask, "mean")
    assert num.dtype == den.dtype == torch.float32 and num.dim() == den.dim() == 0
    assert den.item() == 4
    assert num.item() == pytest.approx(0.5 + 0.25 + 0.8 + 0.3, rel=1e-6)
    assert finalize_statistic(num, den, "mean") == pytest.approx(1.85 / 4, rel=1e-6)

    num, den = step_statistic(logp, mask, "geometric")
    expect = math.exp((math.log(0.5) + math.log(0.25) + math.log(0.8) + math.log(0.3)) / 4)
    assert finalize_statistic(num, den, "geometric") == pytest.approx(expect, rel=1e-6)
    assert finalize_statistic(num, den, "geometric") < 1.85 / 4  # AM-GM


def test_step_statistic_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    logp = torch.rand(4, 37, generator=g).clamp_min(1e-4).log()
    mask = torch.rand(4, 37, generator=g) > 0.3
    for q in (0.1, 0.5, 0.9, 0.01):
        num, den = step_statistic(logp, mask, "quantile", quantile=q)
        expect = torch.quantile(logp.exp()[mask], q).item()
        assert den.item() == mask.sum().item()
        assert finalize_statistic(num, den, "quantile") == pytest.approx(expect, rel=1e-5)


def test_step_statistic_quantile_small_cases():
    num, den = step_statistic(_lp([0.3, 0.9]), torch.tensor([True, False]), "quantile", 0.1)
    assert (num.item(), den.item()) == (pytest.approx(0.3), 1.0)
    num, den = step_statistic(_lp([0.2, 0.4, 0.6]), torch.tensor([1, 1, 1]), "quantile", 0.5)
    assert num.item() == pytest.approx(0.4 * 3)


@pytest.mark.parametrize("statistic", ["mean", "geometric", "quantile"])
def test_step_statistic_all_masked(statistic):
    logp = torch.tensor([[float("-inf"), float("nan"), -0.5]])
    mask = torch.zeros(1, 3, dtype=torch.bool)
    num, den = step_statistic(logp, mask, statistic)
    assert num.item() == 0.0 and den.item() == 0.0
    assert finalize_statistic(num, den, statistic) is None
    # empty tensors too
    num, den = step_statistic(torch.empty(0, 5), torch.empty(0, 5, dtype=torch.bool), statistic)
    assert num.item() == 0.0 and den.item() == 0.0
    # and a controller fed that result does not move
    c = AdaptiveAlpha(statistic=statistic, initial=0.7)
    c.update(finalize_statistic(num, den, statistic))
    assert c.ema == 0.7


@pytest.mark.parametrize("statistic", ["mean", "geometric", "quantile"])
def test_step_statistic_padding_garbage_does_not_leak(statistic):
    logp = torch.tensor([-0.2, float("-inf"), float("nan"), -1.0])
    mask = torch.tensor([True, False, False, True])
    num, den = step_statistic(logp, mask, statistic)
    assert torch.isfinite(num) and den.item() == 2
    clean_num, clean_den = step_statistic(logp[mask], torch.ones(2, dtype=torch.bool), statistic)
    assert num.item() == pytest.approx(clean_num.item()) and den.item() == clean_den.item()


@pytest.mark.parametrize("statistic", ["mean", "geometric"])
def test_step_statistic_sums_across_micro_batches(statistic):
    g = torch.Generator().manual_seed(1)
    logp = torch.rand(6, 20, generator=g).clamp_min(1e-3).log()
    mask = torch.rand(6, 20, generator=g) > 0.5
    whole = step_statistic(logp, mask, statistic)
    parts = [step_statistic(logp[i : i + 2], mask[i : i + 2], statistic) for i in (0, 2, 4)]
    num = sum(p[0] for p in parts)
    den = sum(p[1] for p in parts)
    assert den.item() == whole[1].item()
    assert finalize_statistic(num, den, statistic) == pytest.approx(
        finalize_statistic(*whole, statistic), rel=1e-5
    )


def test_step_statistic_quantile_is_token_weighted_across_micro_batches():
    a = step_statistic(_lp([0.1, 0.2, 0.3, 0.4]), torch.ones(4, dtype=torch.bool), "quantile", 0.5)
    b = step_statistic(_lp([0.9, 0.5]), torch.tensor([True, False]), "quantile", 0.5)
    value = finalize_statistic(a[0] + b[0], a[1] + b[1], "quantile")
    assert value == pytest.approx((0.25 * 4 + 0.9 * 1) / 5, rel=1e-5)


def test_step_statistic_dtype_grad_and_errors():
    logp = torch.tensor([-0.1, -2.0], dtype=torch.bfloat16, requires_grad=True)
    num, den = step_statistic(logp, torch.tensor([1.0, 1.0]), "mean")
    assert num.dtype == torch.float32 and not num.requires_grad
    with pytest.raises(ValueError, match="statistic"):
        step_statistic(logp, torch.ones(2), "median")
    with pytest.raises(ValueError, match="quantile"):
        step_statistic(logp, torch.ones(2), "quantile", quantile=1.0)
    with pytest.raises(ValueError, match="shape"):
        step_statistic(logp, torch.ones(3), "mean")
    with pytest.raises(ValueError, match="statistic"):
        finalize_statistic(1.0, 2.0, "median")


def test_finalize_statistic_plain_floats_and_edge_cases():
    assert finalize_statistic(1.0, 4.0, "mean") == 0.25
    assert finalize_statistic(math.log(0.5) * 3, 3.0, "geometric") == pytest.approx(0.5)
    assert finalize_statistic(float("-inf"), 2.0, "geometric") == 0.0  # a p = 0 token
    assert finalize_statistic(0.0, 0.0, "mean") is None
    assert finalize_statistic(float("nan"), 3.0, "mean") is None


# ----------------------------------------------------------------------------- CLI surface


def test_signatures_typed_and_documented_for_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AdaptiveAlpha, "alpha")
    help_text = parser.format_help()
    for arg in ("alpha_max", "low", "high", "ema_decay", "max_delta", "statistic", "quantile", "initial"):
        assert f"--alpha.{arg}" in help_text
    assert "paper's" in help_text  # docstrings became help
    cfg = parser.parse_args(["--alpha.statistic=geometric", "--alpha.low=0.05"])
    assert cfg.alpha.statistic == "geometric" and cfg.alpha.low == 0.05
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--alpha.statistic=median"])
    for cls in (ConstantAlpha, LinearAlpha, CosineAlpha):
        p = jsonargparse.ArgumentParser(exit_on_error=False)
        p.add_class_arguments(cls, "a")
        assert "steps" in p.format_help() or cls is ConstantAlpha


# ----------------------------------------------------------------------------- PlateauAlpha


# The first design (NLL until val/nll misses, no restore): the decision rule on its own, on a "min" metric.
FIRST = dict(monitor="val/nll", mode="min", restore_best=False, before_rise="nll")


def _plateau(**kwargs):
    from bnll_lightning.alpha import PlateauAlpha

    controller = PlateauAlpha(**{**FIRST, **kwargs})
    assert controller.plan(10) == "validation"
    return controller


@pytest.mark.parametrize(
    "kwargs, sequence, levels",
    [
        # patience 0: the first validation that does not beat the best raises α all the way.
        ({}, [3.0, 2.0, 2.5, 1.0, 4.0], [0, 0, 1, 1, 1]),
        # patience 1: two misses in a row; a new best in between resets the count.
        ({"patience": 1}, [3.0, 3.1, 2.0, 2.2, 2.1], [0, 0, 0, 0, 1]),
        # min_delta: an improvement smaller than it is a miss.
        ({"min_delta": 0.5}, [3.0, 2.8], [0, 1]),
        # two steps of 0.5, capped at alpha_max; never back down.
        ({"alpha_step": 0.5}, [3.0, 3.0, 1.0, 1.5, 0.5, 2.0], [0, 0.5, 0.5, 1.0, 1.0, 1.0]),
        # mode max (e.g. a validation accuracy).
        ({"mode": "max"}, [0.5, 0.6, 0.55], [0, 0, 1]),
        # non-finite values are not validations.
        ({}, [3.0, float("nan"), 2.0], [0, 0, 0]),
    ],
)
def test_plateau_alpha_decides_on_a_scripted_validation_sequence(kwargs, sequence, levels):
    controller = _plateau(**kwargs)
    assert [controller.validate(v) for v in sequence] == pytest.approx(levels)


def test_plateau_alpha_moves_to_its_level_at_max_delta_per_step():
    controller = _plateau(max_delta=0.4)
    assert [controller.update(0.5) for _ in range(2)] == [0.0, 0.0]  # NLL until a validation says otherwise
    controller.validate(2.0)
    controller.validate(2.0)
    assert controller.rises == [2]
    assert [controller.update(0.5) for _ in range(4)] == pytest.approx([0.4, 0.8, 1.0, 1.0])


def test_plateau_alpha_before_rise_adaptive_follows_v3_until_a_rise_lifts_it():
    from bnll_lightning.alpha import AdaptiveAlpha

    controller, reference = _plateau(before_rise="adaptive"), AdaptiveAlpha()
    values = [0.5, 0.95, 0.995, 0.995, 0.995]  # v3's median target: 0 below 0.9, alpha_max above 0.99
    assert [controller.update(v) for v in values] == pytest.approx([reference.update(v) for v in values])
    assert 0.0 < controller.alpha < 1.0
    controller.validate(2.0)
    controller.validate(2.5)  # a miss: the level goes to 1 and holds α there whatever the training p says
    assert [controller.update(0.1) for _ in range(6)][-1] == pytest.approx(1.0)
    assert _plateau().update(0.995) == 0.0  # "nll": the training statistic alone never moves α


def test_plateau_alpha_falls_back_to_adaptive_alpha_with_too_few_validations():
    from bnll_lightning.alpha import AdaptiveAlpha, PlateauAlpha

    controller, reference = PlateauAlpha(patience=2), AdaptiveAlpha()
    with pytest.warns(UserWarning, match="validates 3 time"):
        assert controller.plan(3) == "fallback"  # needs patience + 2 = 4
    assert controller.plan(100) == "fallback"  # decided once
    values = [0.5, 0.95, 0.995, 0.999, 0.999, 0.2]
    assert [controller.update(v) for v in values] == pytest.approx([reference.update(v) for v in values])
    assert controller.validate(0.0) == 0.0 and controller.validations == 0  # validations change nothing


def test_plateau_alpha_state_round_trip_continues_identically():
    from bnll_lightning.alpha import PlateauAlpha

    a = _plateau(patience=1, alpha_step=0.5)
    for v, p in [(3.0, 0.5), (3.5, 0.6), (2.0, 0.7), (2.5, 0.8)]:
        a.validate(v)
        a.update(p)
    b = PlateauAlpha(**FIRST, patience=1, alpha_step=0.5)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for v, p in [(2.6, 0.9), (2.7, 0.9), (1.0, 0.9), (1.1, 0.9), (1.2, 0.9)]:
        assert (a.validate(v), a.update(p)) == (b.validate(v), b.update(p))
    assert a.state_dict() == b.state_dict() and a.rises == b.rises and len(a.rises) == 2


def test_plateau_alpha_rejects_bad_settings_and_a_warm_start():
    from bnll_lightning.alpha import PlateauAlpha

    for kwargs in ({"alpha_step": 0.0}, {"patience": -1}, {"patience": 1.5}, {"mode": "up"}, {"monitor": ""},
                   {"min_delta": -1.0}, {"before_rise": "v3"}):  # fmt: skip
        with pytest.raises(ValueError, match="PlateauAlpha"):
            PlateauAlpha(**kwargs)
    with pytest.raises(RuntimeError, match="warm_start_batches"):
        PlateauAlpha().start(0.5)
