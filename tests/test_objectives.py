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
