import math

import pytest
import torch
import torch.nn.functional as F

from bnll_lightning.objectives import (
    DFT,
    NLL,
    AlphaFamily,
    Focal,
    NegProb,
    ThresholdedNLL,
    TopFraction,
    token_logprobs,
)

ELEMENTWISE = [NLL(), NegProb(), AlphaFamily(0.0), AlphaFamily(0.5), AlphaFamily(1.0), AlphaFamily(10.0),
               DFT(), Focal(2.0), Focal(0.5)]
ALL = ELEMENTWISE + [ThresholdedNLL(0.2), ThresholdedNLL(0.2, normalize="all"), TopFraction(0.3),
                     TopFraction(1.0, normalize="all")]


def batch(B=3, T=7, V=11, seed=0, ignore_last=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :ignore_last] = -100  # prompt
    labels[-1, -3:] = -100  # padding
    return logits, labels


def test_token_logprobs_matches_log_softmax_and_mask():
    logits, labels = batch()
    logp, mask = token_logprobs(logits, labels)
    assert logp.dtype == torch.float32 and mask.dtype == torch.bool
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(logp[mask], ref[mask])
    assert (logp[~mask] == 0).all()
    assert mask.sum() == (labels != -100).sum()


def test_token_logprobs_float32_under_bf16():
    logits, labels = batch()
    logp, _ = token_logprobs(logits.bfloat16(), labels)
    assert logp.dtype == torch.float32
    ref, _ = token_logprobs(logits.bfloat16().float(), labels)
    torch.testing.assert_close(logp, ref)


def test_nll_equals_cross_entropy():
    logits, labels = batch()
    out = NLL()(logits, labels)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert out.normalizer == (labels != -100).sum()


@pytest.mark.parametrize("alpha", [0.0, 1e-10, 1e-7])
def test_alpha_zero_is_nll(alpha):
    logits, labels = batch()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(AlphaFamily(alpha)(logits, labels).loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [1e-6, 1e-3, 0.3, 3.0])
def test_alpha_family_stable_against_float64(alpha):
    # The naive (1 - p**alpha) / alpha loses all precision in float32 for small alpha; expm1 does not.
    logits, labels = batch()
    logp, mask = token_logprobs(logits, labels)
    ref = (-torch.expm1(alpha * logp.double()) / alpha)[mask].mean()
    torch.testing.assert_close(AlphaFamily(alpha).from_logprobs(logp, mask).loss.double(), ref, rtol=1e-6, atol=0)


def test_alpha_one_is_one_minus_p_and_negprob():
    logits, labels = batch()
    logp, mask = token_logprobs(logits, labels)
    ref = (1 - logp.exp())[mask].mean()
    torch.testing.assert_close(AlphaFamily(1.0)(logits, labels).loss, ref)
    torch.testing.assert_close(NegProb()(logits, labels).loss, ref)
    assert NegProb().alpha == 1.0 and NLL().alpha == 0.0 and DFT().alpha is None


def test_alpha_family_closed_form_on_uniform_logits():
    # Uniform logits over V: p = 1/V for every token, so f_alpha = (1 - V^-alpha) / alpha exactly.
    V = 8
    logits = torch.zeros(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    for alpha in [0.5, 1.0, 10.0]:
        expected = (1 - V ** -alpha) / alpha
        assert AlphaFamily(alpha)(logits, labels).loss.item() == pytest.approx(expected, rel=1e-6)
    assert NLL()(logits, labels).loss.item() == pytest.approx(math.log(V), rel=1e-6)
    assert DFT()(logits, labels).loss.item() == pytest.approx(math.log(V) / V, rel=1e-6)
    assert Focal(2.0)(logits, labels).loss.item() == pytest.approx((1 - 1 / V) ** 2 * math.log(V), rel=1e-6)


def test_alpha_is_settable_and_validated():
    obj = AlphaFamily(1.0)
    obj.alpha = 0.25
    assert obj.alpha == 0.25
    with pytest.raises(ValueError, match="alpha"):
        AlphaFamily(-1.0)
    with pytest.raises(ValueError, match="alpha"):
        obj.alpha = float("nan")
    with pytest.raises(ValueError, match="tau"):
        ThresholdedNLL(1.0)
    with pytest.raises(ValueError, match="fraction"):
        TopFraction(0.0)
    with pytest.raises(ValueError, match="gamma"):
        Focal(-1.0)


@pytest.mark.parametrize("objective", ELEMENTWISE, ids=lambda o: o.tag)
def test_gradient_on_correct_logit_is_closed_form_weight(objective):
    # d f(p) / d z_y = f'(p) p (1 - p) = -W_f(p) for the summed (not averaged) loss.
    logits, labels = batch(B=2, T=5, V=9, ignore_last=0)
    logits.requires_grad_(True)
    logp, mask = token_logprobs(logits, labels)
    objective.from_logprobs(logp, mask).loss_sum.backward()
    grad_correct = logits.grad.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    torch.testing.assert_close(grad_correct[mask], -objective.gradient_weight(p)[mask], rtol=1e-4, atol=1e-6)
    assert (logits.grad[~mask] == 0).all()


@pytest.mark.parametrize("objective", ELEMENTWISE, ids=lambda o: o.tag)
def test_f_matches_per_token_value(objective):
    logits, labels = batch()
    logp, mask = token_logprobs(logits, labels)
    out = objective.from_logprobs(logp, mask)
    torch.testing.assert_close(out.loss_sum, objective.f(logp.exp())[mask].sum(), rtol=1e-5, atol=1e-6)


def test_gradient_of_negprob_is_p_times_nll_gradient():
    logits, labels = batch(ignore_last=0)
    grads = []
    for objective in (NegProb(), NLL()):
        x = logits.clone().requires_grad_(True)
        logp, mask = token_logprobs(x, labels)
        per_token = objective.per_token(logp)
        grads.append(torch.autograd.grad(per_token.sum(), x)[0])
    p = token_logprobs(logits, labels)[0].exp()
    torch.testing.assert_close(grads[0], p[..., None] * grads[1])


def test_thresholded_selects_tokens_with_p_at_least_tau():
    logits, labels = batch(V=4)
    logp, mask = token_logprobs(logits, labels)
    out = ThresholdedNLL(0.2)(logits, labels)
    expected = mask & (logp.exp() >= 0.2)
    assert torch.equal(out.selected, expected)
    assert out.normalizer == expected.sum()
    torch.testing.assert_close(out.loss, (-logp[expected]).mean())
    out_all = ThresholdedNLL(0.2, normalize="all")(logits, labels)
    torch.testing.assert_close(out_all.loss, (-logp[expected]).sum() / mask.sum())


def test_thresholded_gradient_is_zero_on_dropped_tokens():
    logits, labels = batch(V=4)
    x = logits.clone().requires_grad_(True)
    out = ThresholdedNLL(0.3)(x, labels)
    out.loss.backward()
    dropped = ~out.selected
    assert (x.grad[dropped] == 0).all()
    assert (x.grad[out.selected].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_top_fraction_selects_most_probable(fraction):
    logits, labels = batch(B=4, T=9, V=6)
    logp, mask = token_logprobs(logits, labels)
    out = TopFraction(fraction)(logits, labels)
    n = int(mask.sum())
    k = math.ceil(fraction * n)
    assert int(out.selected.sum()) == k
    assert not (out.selected & ~mask).any()
    kept, dropped = logp[out.selected], logp[mask & ~out.selected]
    if dropped.numel():
        assert kept.min() >= dropped.max()
    torch.testing.assert_close(out.loss, (-kept).mean())


def test_top_fraction_ties_select_exactly_k():
    logits = torch.zeros(1, 10, 5)  # every token has p = 1/5
    labels = torch.randint(0, 5, (1, 10))
    out = TopFraction(0.3)(logits, labels)
    assert int(out.selected.sum()) == 3


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.tag + o.normalize)
def test_empty_mask_gives_zero_loss_and_finite_zero_gradients(objective):
    logits, labels = batch()
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    out = objective(x, labels)
    assert out.loss.item() == 0.0 and out.normalizer.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.tag + o.normalize)
def test_no_nan_for_confident_tokens(objective):
    # p == 1 in float32 (log p == 0) must not produce NaN gradients (e.g. (1-p)^gamma, gamma < 1).
    logits = torch.full((1, 4, 6), -1e4)
    labels = torch.tensor([[0, 1, 2, -100]])
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1e4
    x = logits.requires_grad_(True)
    out = objective(x, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


def test_objective_output_unpacks_as_tuple_with_loss_first():
    logits, labels = batch()
    loss, loss_sum, normalizer, selected = NLL()(logits, labels)
    torch.testing.assert_close(loss, loss_sum / normalizer)


def test_tags_name_runs():
    assert AlphaFamily(10).tag == "AlphaFamily-alpha10.0"
    assert NLL().tag == "NLL" and NegProb().tag == "NegProb"
    assert ThresholdedNLL().tag == "ThresholdedNLL-tau0.2"


# ------------------------------------------------------------------ objectives beyond log p

from bnll_lightning.alpha import AdaptiveAlpha  # noqa: E402
from bnll_lightning.objectives import ASFT, EAFT, StatsRequest, TokenAlpha, token_stats  # noqa: E402


def test_token_stats_closed_forms_on_uniform_and_one_hot_logits():
    V, k = 10, 4
    logits = torch.zeros(1, 3, V)
    labels = torch.tensor([[1, -100, 2]])
    ref = torch.zeros(1, 3, V)
    ref[..., 0] = 3.0  # reference q = softmax([3, 0, ..., 0])
    s = token_stats(logits, labels, StatsRequest(entropy=True, topk=k, reference=True), ref_logits=ref)
    mask = labels != -100
    torch.testing.assert_close(s.entropy[mask], torch.full((2,), math.log(V)))
    torch.testing.assert_close(s.topk_entropy[mask], torch.full((2,), math.log(k)))
    q = torch.softmax(ref[0, 0], -1)
    forward = (q * q.log()).sum() + math.log(V)  # KL(q || uniform) = log V - H(q)
    torch.testing.assert_close(s.kl[mask], forward.expand(2))
    reverse = token_stats(logits, labels, StatsRequest(reference=True, kl="reverse"), ref_logits=ref).kl
    torch.testing.assert_close(reverse[mask], (-math.log(V) - q.log().mean()).expand(2))  # KL(uniform || q)
    torch.testing.assert_close(s.ref_logp[0, 0], q.log()[1])
    for t in (s.entropy, s.topk_entropy, s.kl, s.ref_logp, s.logp):
        assert t.dtype == torch.float32 and (t[~mask] == 0).all()
    assert not (s.entropy.requires_grad or s.topk_entropy.requires_grad)


@pytest.mark.parametrize("power, normalizer, expected_gate", [
    (1.0, None, 1.0),  # H_k = ln k: the default gate is exactly 1 -> NLL
    (1.0, 3.0, math.log(20) / 3.0),  # LLaMA-Factory's normalisation
    (2.0, 1.0, math.log(20) ** 2),  # axolotl's (none)
    (0.0, 1.0, 1.0),  # power 0 is NLL
])
def test_eaft_closed_form_on_uniform_logits(power, normalizer, expected_gate):
    V = 50
    logits = torch.zeros(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    out = EAFT(power, k=20, normalizer=normalizer)(logits, labels)
    assert out.loss.item() == pytest.approx(expected_gate * math.log(V), rel=1e-6)


def test_eaft_silences_confident_conflicts_and_its_gradient_is_gated_nll():
    logits, labels = batch(V=30)
    logits[0, 3] = 0.0
    logits[0, 3, 5] = 40.0  # the model is sure of token 5...
    labels[0, 3] = 6  # ...and the target disagrees: a confident conflict
    objective = EAFT(1.0, k=20)
    x = logits.clone().requires_grad_(True)
    out = objective(x, labels)
    out.loss_sum.backward()
    y = logits.clone().requires_grad_(True)
    stats = token_stats(y, labels, StatsRequest(topk=20))
    gate = (stats.topk_entropy / math.log(20)).detach()
    (-stats.logp * gate).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert gate[0, 3] < 1e-12 and x.grad[0, 3].abs().max() < 1e-9  # near-zero entropy: (almost) no gradient


def test_asft_closed_form_and_gradient():
    V, lam = 8, 0.5
    logits = torch.zeros(2, 4, V, requires_grad=True)
    labels = torch.randint(0, V, (2, 4))
    labels[1, :2] = -100
    ref = torch.zeros(2, 4, V)
    ref[..., 3] = 2.0
    q = torch.softmax(ref[0, 0], -1)
    out = ASFT(kl_weight=lam)(logits, labels, ref_logits=ref)
    expected = math.log(V) / V + lam * (math.log(V) + (q * q.log()).sum().item())  # DFT + lambda KL(q || uniform)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss_sum.backward()
    # d/dz [-sg(p) log p + lam KL(q || p)] = p (p - onehot) + lam (p - q) on each counted token
    p = torch.full((V,), 1 / V)
    onehot = F.one_hot(labels[0, 0], V).float()
    torch.testing.assert_close(logits.grad[0, 0], p * (p - onehot) + lam * (p - q))
    assert (logits.grad[1, :2] == 0).all()
    # Reference equal to the model: KL = 0, ASFT is DFT (value and gradient).
    x, y = logits.detach().clone().requires_grad_(True), logits.detach().clone().requires_grad_(True)
    ASFT(kl_weight=3.0)(x, labels, ref_logits=x.detach()).loss.backward()
    DFT()(y, labels).loss.backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_asft_needs_the_reference():
    logits, labels = batch()
    with pytest.raises(ValueError, match="ref_logits"):
        ASFT()(logits, labels)
    with pytest.raises(ValueError, match="KL divergence"):
        ASFT().from_logprobs(*token_logprobs(logits, labels))
    with pytest.raises(ValueError, match="top-k entropy"):
        EAFT().from_logprobs(*token_logprobs(logits, labels))


def test_token_alpha_matches_adaptive_alpha_map_and_is_monotone():
    objective = TokenAlpha(alpha=2.0, low=0.1, high=0.55)
    controller = AdaptiveAlpha(alpha_max=2.0, low=0.1, high=0.55)
    p = torch.tensor([1e-4, 0.05, 0.1, 0.2, 0.235, 0.4, 0.55, 0.9, 1.0])
    alpha_t = objective.token_alpha(p.log())
    expected = torch.tensor([controller.target(float(x)) for x in p])
    torch.testing.assert_close(alpha_t, expected)
    assert (alpha_t.diff() >= 0).all() and alpha_t[0] == 0 and alpha_t[-1] == 2.0


@pytest.mark.parametrize("V", [2, 3, 20])
@pytest.mark.parametrize("signal", ["p", "entropy"])
def test_token_alpha_closed_form_on_uniform_logits(V, signal):
    # Uniform logits: p = 1/V and exp(-H) = 1/V, so both signals give alpha_t = target(1/V).
    logits = torch.zeros(2, 3, V)
    labels = torch.randint(0, V, (2, 3))
    a = AdaptiveAlpha(alpha_max=1.5, low=0.1, high=0.55).target(1 / V)  # TokenAlpha's own defaults
    expected = math.log(V) if a == 0 else (1 - V ** -a) / a
    out = TokenAlpha(1.5, signal=signal)(logits, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert (a == 0) == (V == 20)  # 1/20 is below low: NLL there


@pytest.mark.parametrize("signal", ["p", "entropy"])
def test_token_alpha_zero_is_nll(signal):
    logits, labels = batch()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(TokenAlpha(0.0, signal=signal)(logits, labels).loss, ref, rtol=1e-6, atol=0)


def test_token_alpha_gradient_weight_holds_alpha_t_fixed():
    objective = TokenAlpha(1.0)
    logits, labels = batch(B=2, T=5, V=9, ignore_last=0)
    logits.requires_grad_(True)
    logp, mask = token_logprobs(logits, labels)
    objective.from_logprobs(logp, mask).loss_sum.backward()
    grad_correct = logits.grad.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    torch.testing.assert_close(grad_correct[mask], -objective.gradient_weight(p)[mask], rtol=1e-4, atol=1e-6)


NEW = [EAFT(), EAFT(2.0, k=5, normalizer=3.0), ASFT(0.1), ASFT(1.0, direction="reverse"), TokenAlpha(1.0),
       TokenAlpha(10.0, signal="entropy")]


@pytest.mark.parametrize("objective", NEW, ids=lambda o: o.tag + str(o.requires))
def test_new_objectives_all_tokens_ignored_and_confident_tokens(objective):
    logits, labels = batch()
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    out = objective(x, labels, ref_logits=logits.flip(-1))
    assert out.loss.item() == 0.0 and out.normalizer.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    confident = torch.full((1, 4, 6), -1e4)
    confident[0, torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1e4
    x = confident.requires_grad_(True)
    out = objective(x, torch.tensor([[0, 1, 2, -100]]), ref_logits=confident.detach().roll(1, -1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


def test_new_objectives_validate_and_tag():
    with pytest.raises(ValueError, match="k"):
        EAFT(k=1)
    with pytest.raises(ValueError, match="power"):
        EAFT(power=-1.0)
    with pytest.raises(ValueError, match="normalizer"):
        EAFT(normalizer=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        ASFT(kl_weight=-1.0)
    with pytest.raises(ValueError, match="low"):
        TokenAlpha(low=0.6, high=0.5)
    with pytest.raises(ValueError, match="signal"):
        TokenAlpha(signal="q")
    assert EAFT().tag == "EAFT-power1.0-k20" and ASFT().tag == "ASFT-kl0.1"
    assert TokenAlpha(1.0).tag == "TokenAlpha-alpha1.0-signalp"
    assert EAFT().requires == StatsRequest(topk=20) and TokenAlpha().requires == StatsRequest()
    assert not TokenAlpha().requires.any and not NLL().requires.any


def test_which_objectives_an_alpha_controller_can_drive():
    from bnll_lightning.objectives import SupportsAlpha

    assert isinstance(AlphaFamily(0.0), SupportsAlpha) and isinstance(TokenAlpha(), SupportsAlpha)
    for objective in (NLL(), NegProb(), DFT(), EAFT(), ASFT(), ThresholdedNLL()):
        assert not isinstance(objective, SupportsAlpha)


def test_top_fraction_keeps_exactly_ceil_of_fraction_times_n_in_integers():
    from bnll_lightning.objectives import TopFraction

    logp = -torch.rand(1, 100)
    mask = torch.ones(1, 100, dtype=torch.bool)
    for fraction, k in ((0.3, 30), (0.1, 10), (0.07, 7), (0.333, 34), (1.0, 100)):
        assert int(TopFraction(fraction).select(logp, mask).sum()) == k, fraction
