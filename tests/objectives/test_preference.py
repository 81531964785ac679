"""Preference losses against numbers worked out by hand (arithmetic in the comments)."""

import math

import pytest
import torch

from recalign.errors import RecalignInputError
from recalign.objectives import chosen_nll, dmpo_loss, dpo_loss, preference_loss, sdpo_loss


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------- S-DPO
def test_sdpo_hand_value_zero_reference():
    # β = 1, reference 0 → rewards equal the policy log-probs: r_w = 0.5, r = [0.2, −0.1]
    # gaps r_i − r_w = [−0.3, −0.6]
    # e^{−0.3} = 0.740818, e^{−0.6} = 0.548812
    # L = log(1 + 0.740818 + 0.548812) = log(2.289630) = 0.828390
    out = sdpo_loss(t([[0.5, 0.2, -0.1]]), t([[0.0, 0.0, 0.0]]), beta=1.0)
    assert out.loss.item() == pytest.approx(0.828390, abs=1e-5)
    # diagnostics: chosen reward 0.5, rejected mean (0.2 − 0.1)/2 = 0.05, margin 0.45, 0.5 > 0.2 → acc 1
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(0.05)
    assert out.margins.item() == pytest.approx(0.45)
    assert out.accuracy.item() == 1.0


def test_sdpo_hand_value_with_reference_and_beta():
    # policy [−3, −4, −2], reference [−3.5, −3, −2.5] → r = [0.5, −1.0, 0.5]
    # β = 2 → β r = [1, −2, 1]; gaps = [−2 − 1, 1 − 1] = [−3, 0]
    # L = log(1 + e^{−3} + e^{0}) = log(2 + 0.049787) = log(2.049787) = 0.717736
    out = sdpo_loss(t([[-3.0, -4.0, -2.0]]), t([[-3.5, -3.0, -2.5]]), beta=2.0)
    assert out.loss.item() == pytest.approx(0.717736, abs=1e-5)
    # chosen β r_w = 1 ties the second negative (1): "beats every negative" is False
    assert out.accuracy.item() == 0.0
    # margin = 1 − mean(−2, 1) = 1 − (−0.5) = 1.5
    assert out.margins.item() == pytest.approx(1.5)


def test_sdpo_gradients_match_hand_derivation():
    # With S = Σ_i e^{gap_i} = 0.740818 + 0.548812 = 1.289630 (first test):
    #   ∂L/∂p_w = −β S/(1+S) = −1.289630/2.289630 = −0.563248
    #   ∂L/∂p_i = β e^{gap_i}/(1+S): 0.740818/2.289630 = 0.323554, 0.548812/2.289630 = 0.239694
    p = t([[0.5, 0.2, -0.1]]).requires_grad_()
    sdpo_loss(p, torch.zeros(1, 3), beta=1.0).loss.backward()
    assert p.grad[0].tolist() == pytest.approx([-0.563248, 0.323554, 0.239694], abs=1e-5)


def test_sdpo_finite_at_reward_gaps_of_1000():
    # row 0: r_w = 0, r_1 = +1000 → gap 1000: L = log(1 + e^{1000}) = 1000 (+ e^{−1000}) exactly in float32
    # row 1: r_w = 0, r_1 = −1000 → gap −1000: L = log(1 + e^{−1000}) = 0
    policy = t([[0.0, 1000.0], [0.0, -1000.0]]).requires_grad_()
    # the reference code's raw exp overflows on the same numbers
    assert math.isinf(torch.log(1 + torch.exp(torch.tensor(1000.0))).item())
    out = sdpo_loss(policy, torch.zeros(2, 2), beta=1.0)
    assert out.losses.tolist() == pytest.approx([1000.0, 0.0], abs=1e-4)
    out.loss.backward()
    # batch mean ½(L0 + L1): row 0 is saturated, ∂L0/∂p_w = −σ(1000) = −1, ∂L0/∂p_1 = +1, times ½;
    # row 1 is fully satisfied: σ(−1000) = 0 → zero gradient.
    assert torch.isfinite(policy.grad).all()
    assert policy.grad.flatten().tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0], abs=1e-6)


def test_sdpo_finite_with_several_huge_negatives():
    # K = 3, gaps [1000, 999, −1000]: L = log(1 + e^{1000} + e^{999} + e^{−1000})
    #   = 1000 + log(1 + e^{−1}) = 1000 + 0.313262 (e^{−1000}, e^{−1000} terms vanish)
    policy = t([[0.0, 1000.0, 999.0, -1000.0]]).requires_grad_()
    out = sdpo_loss(policy, torch.zeros(1, 4), beta=1.0)
    assert out.loss.item() == pytest.approx(1000.313262, abs=1e-3)
    out.loss.backward()
    # softmax weights of the saturated negatives: 1/(1+e^{−1}) = 0.731059, e^{−1}/(1+e^{−1}) = 0.268941
    assert policy.grad[0].tolist() == pytest.approx([-1.0, 0.731059, 0.268941, 0.0], abs=1e-4)


def test_sdpo_k1_equals_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(64, 2, generator=g) * 20
    reference = torch.randn(64, 2, generator=g) * 20
    for beta in (0.1, 1.0, 5.0):
        a = sdpo_loss(policy, reference, beta=beta)
        b = dpo_loss(policy, reference, beta=beta)
        assert torch.equal(a.losses, b.losses)
        assert torch.equal(a.accuracy, b.accuracy)


def test_sdpo_mask_excludes_padding_negatives():
    # the third negative (99) is padding: the loss must equal the unpadded first test (0.828390)
    policy = t([[0.5, 0.2, -0.1, 99.0], [0.5, 0.2, -0.1, -0.1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = sdpo_loss(policy, torch.zeros(2, 4), beta=1.0, negative_mask=mask)
    assert out.losses[0].item() == pytest.approx(0.828390, abs=1e-5)
    # row 1 has a second −0.1 negative: log(1 + e^{−0.3} + 2 e^{−0.6}) = log(2.838442) = 1.043255
    assert out.losses[1].item() == pytest.approx(1.043255, abs=1e-5)
    # padding with reward 99 would beat the chosen one, yet row 0 stays "accurate" and its mean is 0.05
    assert out.accuracy[0].item() == 1.0
    assert out.rejected_rewards[0].item() == pytest.approx(0.05)


# ---------------------------------------------------------------------- DPO
def test_dpo_hand_value():
    # policy [−10, −12], reference [−11, −11] → r_w = 1, r_1 = −1; β = 0.1 → β(r_w − r_1) = 0.2
    # L = −log σ(0.2) = log(1 + e^{−0.2}) = log(1.818731) = 0.598139
    out = dpo_loss(t([[-10.0, -12.0]]), t([[-11.0, -11.0]]), beta=0.1)
    assert out.loss.item() == pytest.approx(0.598139, abs=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # β r_w
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_rejects_more_than_one_negative():
    with pytest.raises(ValueError, match="exactly one negative"):
        dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------------- DMPO
def test_dmpo_hand_value():
    # β = 1, reference 0: r_w = 0.5, negatives [0.2, −0.1] → mean 0.05
    # L = −log σ(0.5 − 0.05) = log(1 + e^{−0.45}) = log(1.637628) = 0.493249
    out = dmpo_loss(t([[0.5, 0.2, -0.1]]), torch.zeros(1, 3), beta=1.0)
    assert out.loss.item() == pytest.approx(0.493249, abs=1e-5)


def test_dmpo_uses_the_reference_of_each_negative():
    # policy [−2, −3, −5], reference [−2.5, −2, −6] → r = [0.5, −1, 1]; mean negative reward 0
    # L = log(1 + e^{−0.5}) = log(1.606531) = 0.474077
    # (the released code uses the *chosen* reference −2.5 for the negatives: r_neg = [−0.5, −2.5],
    #  mean −1.5, L = log(1 + e^{−2}) = 0.126928 — that value must NOT come out)
    out = dmpo_loss(t([[-2.0, -3.0, -5.0]]), t([[-2.5, -2.0, -6.0]]), beta=1.0)
    assert out.loss.item() == pytest.approx(0.474077, abs=1e-5)
    assert abs(out.loss.item() - 0.126928) > 0.1


def test_dmpo_nll_term_and_gradients():
    # Same rewards as test_dmpo_hand_value plus λ·NLL with λ = 0.5 and NLL 0.7: 0.493249 + 0.35 = 0.843249
    p = t([[0.5, 0.2, -0.1]]).requires_grad_()
    nll = torch.tensor([0.7])
    out = dmpo_loss(p, torch.zeros(1, 3), beta=1.0, chosen_nll=nll, nll_weight=0.5)
    assert out.loss.item() == pytest.approx(0.843249, abs=1e-5)
    out.loss.backward()
    # x = mean_neg − r_w = −0.45, σ(−0.45) = 0.389361:
    #   ∂L/∂p_w = −σ(x) = −0.389361; ∂L/∂p_i = σ(x)/K = 0.194680 each
    assert p.grad[0].tolist() == pytest.approx([-0.389361, 0.194680, 0.194680], abs=1e-5)


def test_dmpo_mask_averages_real_negatives_only():
    # negatives [0.2, −0.1, pad 50]: mean over the two real ones is 0.05 → same 0.493249 as unmasked
    out = dmpo_loss(
        t([[0.5, 0.2, -0.1, 50.0]]),
        torch.zeros(1, 4),
        beta=1.0,
        negative_mask=torch.tensor([[True, True, False]]),
    )
    assert out.loss.item() == pytest.approx(0.493249, abs=1e-5)


def test_dmpo_finite_at_1000():
    p = t([[0.0, 1000.0, -1000.0], [1000.0, -1000.0, -1000.0]]).requires_grad_()
    out = dmpo_loss(p, torch.zeros(2, 3), beta=1.0)
    # row 0: mean negative 0 → log(1 + e^0) = log 2 = 0.693147; row 1: x = −2000 → 0
    assert out.losses.tolist() == pytest.approx([0.693147, 0.0], abs=1e-5)
    out.loss.backward()
    assert torch.isfinite(p.grad).all()


def test_chosen_nll_mean_and_sum():
    # summed log-prob −6 over 3 tokens: per-token NLL 2, summed NLL 6
    assert chosen_nll(torch.tensor([-6.0]), torch.tensor([3])).item() == pytest.approx(2.0)
    assert chosen_nll(torch.tensor([-6.0]), torch.tensor([3]), reduction="sum").item() == 6.0
    with pytest.raises(ValueError):
        chosen_nll(torch.tensor([-6.0]), torch.tensor([3]), reduction="max")


# ---------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("name", ["dpo", "sdpo", "dmpo"])
def test_raising_chosen_logprob_lowers_the_loss(name):
    g = torch.Generator().manual_seed(1)
    k = 1 if name == "dpo" else 3
    policy = (torch.randn(8, 1 + k, generator=g) - 5).requires_grad_()
    reference = torch.randn(8, 1 + k, generator=g) - 5
    out = preference_loss(name, policy, reference, beta=0.5)
    out.loss.backward()
    assert (policy.grad[:, 0] < 0).all()  # chosen up → loss down
    assert (policy.grad[:, 1:] > 0).all()  # negatives up → loss up
    with torch.no_grad():
        bumped = policy.clone()
        bumped[:, 0] += 0.1
        assert preference_loss(name, bumped, reference, beta=0.5).loss < out.loss


@pytest.mark.parametrize("fn", [sdpo_loss, dmpo_loss, dpo_loss])
def test_reference_never_receives_gradient(fn):
    policy = torch.zeros(2, 2, requires_grad=True)
    reference = torch.zeros(2, 2, requires_grad=True)
    fn(policy, reference).loss.backward()
    assert reference.grad is None
    assert policy.grad is not None


def test_input_validation():
    with pytest.raises(ValueError, match="does not match"):
        sdpo_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        sdpo_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no real negative"):
        sdpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), negative_mask=torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(RecalignInputError, match="unknown preference loss"):
        preference_loss("ipo", torch.zeros(1, 2), torch.zeros(1, 2))


def test_metrics_are_batch_means():
    out = sdpo_loss(t([[0.5, 0.2, -0.1], [0.0, 1.0, 2.0]]), torch.zeros(2, 3))
    m = out.metrics(prefix="train/")
    # accuracies: row 0 wins, row 1 loses → 0.5; chosen mean (0.5 + 0)/2 = 0.25
    assert m["train/rewards/accuracies"] == 0.5
    assert m["train/rewards/chosen"] == pytest.approx(0.25)
    assert m["train/loss"] == pytest.approx(out.loss.item())


# ---------------------------------------------------------------------- numerical edge cases (issue #20)
# AnswerScores pads missing negatives with −∞ (lm/scoring.py), so a padded slot of the reward is
# −∞ − (−∞) = NaN; whatever sits in a padded slot must not reach the loss, the gradient or the diagnostics.
# (policy, reference) in the padded slot: the −∞ padding, NaN either side, ±∞ that make ∞ or NaN
# rewards, finite values that overflow float32 when subtracted (3e38 − (−3e38) = ∞) and harmless junk.
INF, NAN = float("inf"), float("nan")
PAD_JUNK = [(-INF, -INF), (NAN, 0.0), (0.0, NAN), (INF, -INF), (INF, INF), (3e38, -3e38), (50.0, -7.0)]


@pytest.mark.parametrize("pad_policy, pad_reference", PAD_JUNK)
def test_dmpo_ignores_whatever_is_in_padded_slots(pad_policy, pad_reference):
    # the repro: policy [−3, −4, −5, pad], reference [−3.5, −3, −4, pad], mask [T, T, F]
    # r = [0.5, −1, −1] → mean real negative −1, L = log(1 + e^{−1.5}) = log(1.223130) = 0.201413
    policy = t([[-3.0, -4.0, -5.0, pad_policy]]).requires_grad_()
    reference = t([[-3.5, -3.0, -4.0, pad_reference]])
    mask = torch.tensor([[True, True, False]])
    out = dmpo_loss(policy, reference, beta=1.0, negative_mask=mask)
    assert out.loss.item() == pytest.approx(0.201413, abs=1e-5)
    assert out.rejected_rewards.item() == pytest.approx(-1.0)
    assert out.margins.item() == pytest.approx(1.5)
    assert out.accuracy.item() == 1.0
    out.loss.backward()
    # σ(−1.5) = 0.182426: ∂L/∂p_w = −0.182426, ∂L/∂p_i = 0.182426/2 = 0.091213 per real negative, 0 on padding
    assert policy.grad[0].tolist() == pytest.approx([-0.182426, 0.091213, 0.091213, 0.0], abs=1e-5)


@pytest.mark.parametrize("pad_policy, pad_reference", PAD_JUNK)
def test_sdpo_ignores_whatever_is_in_padded_slots(pad_policy, pad_reference):
    # same numbers as test_sdpo_hand_value_zero_reference with a padded third negative: L = 0.828390
    policy = t([[0.5, 0.2, -0.1, pad_policy]]).requires_grad_()
    reference = t([[0.0, 0.0, 0.0, pad_reference]])
    mask = torch.tensor([[True, True, False]])
    out = sdpo_loss(policy, reference, beta=1.0, negative_mask=mask)
    assert out.loss.item() == pytest.approx(0.828390, abs=1e-5)
    assert out.rejected_rewards.item() == pytest.approx(0.05)
    assert out.margins.item() == pytest.approx(0.45)
    assert out.accuracy.item() == 1.0
    out.loss.backward()
    assert policy.grad[0].tolist() == pytest.approx([-0.563248, 0.323554, 0.239694, 0.0], abs=1e-5)


def test_sdpo_gradients_exact_in_float32_at_gaps_of_1e4():
    # K = 7 negatives all at gap +1e4 (β = 1, reference 0): the softmax over [0, 1e4 × 7] puts 1/7 on each
    # negative and e^{−1e4} ≈ 0 on the positive, so ∂L/∂p_w = −1 and ∂L/∂p_i = 1/7 = 0.142857;
    # L = 1e4 + log 7 = 10001.945910 (float32 spacing at 1e4 is 2^−10 ≈ 0.001).
    # softplus(logsumexp) rounds lse to float32 first and gave [−0.999621, 0.142803 × 7].
    policy = torch.tensor([[0.0] + [1e4] * 7], dtype=torch.float32, requires_grad=True)
    out = sdpo_loss(policy, torch.zeros(1, 8), beta=1.0)
    assert out.loss.item() == pytest.approx(1e4 + math.log(7), abs=1e-3)
    out.loss.backward()
    assert policy.grad.dtype == torch.float32
    assert policy.grad[0].tolist() == pytest.approx([-1.0] + [1 / 7] * 7, abs=1e-6)
    # gap −1e4: the positive wins outright, L = log(1 + 7 e^{−1e4}) = 0 and every gradient is 0
    policy = torch.tensor([[0.0] + [-1e4] * 7], dtype=torch.float32, requires_grad=True)
    out = sdpo_loss(policy, torch.zeros(1, 8), beta=1.0)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert policy.grad[0].tolist() == [0.0] * 8


def test_sdpo_gradients_exact_in_float32_mixed_gaps():
    # K = 3, gaps [1000, 1000, 1000] (the 2e-5 case) and [+1e4, −1e4, −1e4]
    # row 0: weights 1/3 each → [−1, 1/3, 1/3, 1/3]; row 1: all weight on the +1e4 negative → [−1, 1, 0, 0]
    # (both ×½ from the batch mean)
    policy = torch.tensor([[0.0, 1e3, 1e3, 1e3], [0.0, 1e4, -1e4, -1e4]], requires_grad=True)
    out = sdpo_loss(policy, torch.zeros(2, 4), beta=1.0)
    assert out.losses.tolist() == pytest.approx([1e3 + math.log(3), 1e4], abs=1e-3)
    out.loss.backward()
    expected = [[-0.5, 1 / 6, 1 / 6, 1 / 6], [-0.5, 0.5, 0.0, 0.0]]
    assert policy.grad.tolist()[0] == pytest.approx(expected[0], abs=1e-7)
    assert policy.grad.tolist()[1] == pytest.approx(expected[1], abs=1e-7)


def test_loss_betas_have_one_documented_reason():
    # dpo_loss keeps the DPO paper's / TRL's β = 0.1, sdpo/dmpo the S-DPO scripts' β = 1; each docstring
    # says so, and preference_loss warns that its defaults differ per loss.
    import inspect

    assert inspect.signature(dpo_loss).parameters["beta"].default == 0.1
    assert inspect.signature(sdpo_loss).parameters["beta"].default == 1.0
    assert inspect.signature(dmpo_loss).parameters["beta"].default == 1.0
    for fn in (dpo_loss, sdpo_loss, dmpo_loss, preference_loss):
        assert "default" in fn.__doc__ and "β" in fn.__doc__
