"""Preference losses for recommendation: DPO, S-DPO (softmax DPO) and DMPO.

All three are small pure functions of *per-answer* summed log-probabilities, so they do not care how
those were computed (shared-prefix scoring, the naive layout, a precomputed reference cache):

- ``policy``: ``[B, 1+K]`` log πθ(y|x) summed over answer tokens, differentiable;
- ``reference``: ``[B, 1+K]`` log πref(y|x), treated as a constant (it is detached here, so passing a
  tensor that still carries a graph cannot leak gradient into the reference);
- column 0 is the chosen answer y_w (the positive item), columns 1..K the rejected answers (negatives).

With the implicit reward r(y) = log πθ(y|x) − log πref(y|x) and temperature β:

- DPO (Rafailov et al.):       L = −log σ(β(r_w − r_1))                                 (K must be 1)
- S-DPO (Chen et al. 2024):    L = log(1 + Σ_i exp(β(r_i − r_w)))
- DMPO (Bai et al. 2024):      L = −log σ(β r_w − (β/K) Σ_i r_i)  [+ λ · NLL(y_w)]

Numerics. The S-DPO reference implementation evaluates Σ exp(·) directly and overflows to ``inf`` (then
``nan`` gradients) as soon as a reward gap exceeds ~88/β in float32. Here it is
``−log_softmax([0, g_1, …, g_K])[0]`` with g_i = β(r_i − r_w), which is log(1 + Σ_i exp g_i) exactly:
log_softmax subtracts the row maximum before exponentiating and its gradient is the softmax itself, so
loss and gradient are finite *and* exact in float32 at gaps of ±1e4 (∂L/∂p_w = −1, ∂L/∂p_i = 1/K when K
negatives sit at +1e4). ``softplus(logsumexp(g))``, the obvious alternative, rounds the logsumexp to
float32 first (its spacing is ~1e-3 at 1e4) and the gradient inherits that: −0.99962 instead of −1. For
K = 1 the two-way softmax is ``softplus(g_1)``, evaluated as such, so S-DPO is *bit-for-bit* DPO
(``softplus(β(r_1 − r_w))`` is exactly −log σ(β(r_w − r_1))).

DMPO. The released DMPO code passes the chosen reference log-probs in place of the rejected ones, so the
reference terms cancel and the loss silently becomes reference-free; here the reference of every
negative is used, as in the paper. Its negatives are averaged *inside* the sigmoid (one comparison of the
positive against the mean negative), not turned into K independent pairs.

A variable number of negatives per row is supported through ``negative_mask`` (``[B, K]`` bool, True for
a real negative, False for padding). Every row must keep at least one real negative: a row with none
has no preference to learn from and is a data bug, so it raises instead of contributing a silent zero.
Padded slots are *selected away* (``torch.where``), never multiplied by 0: ``AnswerScores`` pads with −∞,
so a padded reward is −∞ − (−∞) = NaN, and NaN · 0 is NaN. Whatever a padded slot holds (±∞, NaN,
junk) reaches neither the loss, the gradient nor the diagnostics.

β defaults. ``dpo_loss`` defaults to β = 0.1 (the DPO paper's and TRL's default, and DPO4Rec's
``dpo.beta``); ``sdpo_loss`` and ``dmpo_loss`` default to β = 1 (the S-DPO reference scripts, and the
``align`` recipe's default for both multi-negative losses). Each default is the value its own method is
published and run with, so they differ on purpose; every recalign caller passes β explicitly, and so
should code comparing losses (S-DPO at K = 1 equals DPO only at the same β).

Diagnostics follow the TRL convention: rewards are reported *scaled by β* (β·r), detached, per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recalign.errors import RecalignInputError

__all__ = [
    "PreferenceOutput",
    "chosen_nll",
    "dmpo_loss",
    "dpo_loss",
    "preference_loss",
    "sdpo_loss",
    "LOSSES",
]


@dataclass(frozen=True)
class PreferenceOutput:
    """Loss and per-row diagnostics of one preference batch.

    Attributes:
        loss: scalar, mean of ``losses`` over the batch (what is back-propagated).
        losses: ``[B]`` per-row loss (with gradient).
        chosen_rewards: ``[B]`` β·r(y_w), detached.
        rejected_rewards: ``[B]`` mean of β·r(y_i) over the row's real negatives, detached.
        margins: ``[B]`` ``chosen_rewards − rejected_rewards``.
        accuracy: ``[B]`` 1.0 where the chosen reward beats *every* real negative's reward, else 0.0.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Batch means as plain floats, named like TRL's logs (``rewards/chosen`` ...)."""
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}rewards/chosen": float(self.chosen_rewards.mean()),
            f"{prefix}rewards/rejected": float(self.rejected_rewards.mean()),
            f"{prefix}rewards/margins": float(self.margins.mean()),
            f"{prefix}rewards/accuracies": float(self.accuracy.mean()),
        }


# ---------------------------------------------------------------------- helpers
def _check_inputs(
    policy: torch.Tensor, reference: torch.Tensor, negative_mask: torch.Tensor | None
) -> torch.Tensor:
    """Validate shapes and return the ``[B, K]`` bool mask of real negatives."""
    if policy.dim() != 2 or policy.shape[1] < 2:
        raise ValueError(f"policy must be [B, 1+K] with K >= 1, got shape {tuple(policy.shape)}")
    if reference.shape != policy.shape:
        raise ValueError(
            f"reference shape {tuple(reference.shape)} does not match policy shape {tuple(policy.shape)}"
        )
    b, k1 = policy.shape
    if negative_mask is None:
        return torch.ones(b, k1 - 1, dtype=torch.bool, device=policy.device)
    if negative_mask.shape != (b, k1 - 1):
        raise ValueError(f"negative_mask must be [B, K] = {(b, k1 - 1)}, got {tuple(negative_mask.shape)}")
    mask = negative_mask.to(device=policy.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        bad = int((~mask.any(dim=1)).nonzero()[0])
        raise ValueError(f"row {bad} has no real negative (negative_mask is all False)")
    return mask


def _rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """β·(log πθ − log πref), ``[B, 1+K]``; the reference never carries gradient."""
    return beta * (policy - reference.detach().to(policy.dtype))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row mean of ``values`` over ``mask``; padded slots are selected away, so NaN/±∞ there cannot leak
    (``values * mask`` would turn a NaN or ∞ into NaN, and so would its gradient)."""
    picked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return picked.sum(dim=1) / mask.sum(dim=1).to(values.dtype)


def _diagnostics(losses: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> PreferenceOutput:
    r = rewards.detach()
    chosen = r[:, 0]
    neg = r[:, 1:]
    rejected_mean = _masked_mean(neg, mask)
    # chosen must beat every *real* negative; padded slots can never block it.
    neg_max = torch.where(mask, neg, torch.full((), float("-inf"), dtype=neg.dtype, device=neg.device)).amax(
        dim=1
    )
    accuracy = (chosen > neg_max).to(r.dtype)
    return PreferenceOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen,
        rejected_rewards=rejected_mean,
        margins=chosen - rejected_mean,
        accuracy=accuracy,
    )


# ---------------------------------------------------------------------- losses
def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> PreferenceOutput:
    """Pairwise DPO: L = −log σ(β(r_w − r_1)) = softplus(β(r_1 − r_w)).

    Args:
        policy: ``[B, 2]`` summed answer log-probs under the policy (column 0 chosen, column 1 rejected).
        reference: ``[B, 2]`` the same under the reference model.
        beta: temperature β (> 0): how far the policy may move from the reference. The default 0.1 is the
            DPO paper's and TRL's (and DPO4Rec's ``dpo.beta``); :func:`sdpo_loss` and :func:`dmpo_loss`
            default to 1, their own papers' value (module docstring, "β defaults").
    """
    if policy.dim() != 2 or policy.shape[1] != 2:
        raise ValueError(
            f"DPO takes exactly one negative: policy must be [B, 2], got {tuple(policy.shape)} "
            "(use sdpo_loss or dmpo_loss for K > 1)"
        )
    mask = _check_inputs(policy, reference, None)
    r = _rewards(policy, reference, beta)
    losses = F.softplus(r[:, 1] - r[:, 0])
    return _diagnostics(losses, r, mask)


def sdpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float = 1.0,
    negative_mask: torch.Tensor | None = None,
) -> PreferenceOutput:
    """Softmax DPO: L = log(1 + Σ_i exp(β(r_i − r_w))), computed as −log_softmax([0, gaps])[0].

    Equivalent to −log σ(−log Σ_i exp(β(r_i − r_w))): the positive competes against all K negatives at
    once through a softmax over implicit rewards. K = 1 reduces exactly (bit for bit) to
    :func:`dpo_loss` at the same β. Loss and gradient are exact in float32 at reward gaps of ±1e4.

    Args:
        policy, reference: ``[B, 1+K]`` summed answer log-probs (column 0 chosen).
        beta: temperature β; the default 1 is the S-DPO reference scripts' value (:func:`dpo_loss`
            defaults to DPO's 0.1; module docstring, "β defaults").
        negative_mask: optional ``[B, K]`` bool, False marks padding negatives (excluded from the sum,
            whatever value they hold).
    """
    mask = _check_inputs(policy, reference, negative_mask)
    r = _rewards(policy, reference, beta)
    neg_inf = torch.full((), float("-inf"), dtype=r.dtype, device=r.device)
    gaps = torch.where(mask, r[:, 1:] - r[:, :1], neg_inf)
    if gaps.shape[1] == 1:
        # the two-way softmax: −log_softmax([0, g])[0] = softplus(g), kept in that form so K = 1 is DPO's
        # exact expression (every row has a real negative, so the mask is all True here)
        losses = F.softplus(gaps[:, 0])
    else:
        # log(1 + Σ e^{g_i}) as a log-softmax over [0, g_1..g_K]: the max is subtracted before exp and the
        # gradient is the softmax itself, with no rounded logsumexp in between (exact at gaps of 1e4)
        logits = torch.cat([torch.zeros_like(gaps[:, :1]), gaps], dim=1)
        losses = -F.log_softmax(logits, dim=1)[:, 0]
    return _diagnostics(losses, r, mask)


def dmpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float = 1.0,
    negative_mask: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 1.0,
) -> PreferenceOutput:
    """Direct Multi-Preference Optimisation: L = −log σ(β r_w − (β/K) Σ_i r_i) + λ·NLL(y_w).

    The positive is compared once against the *mean* implicit reward of its K negatives (with a mask,
    the mean over the row's real negatives; padded slots are selected away, so the −∞ padding of
    ``AnswerScores`` or any other value there cannot turn the loss into NaN). The optional SFT term keeps
    the chosen answer likely.

    Args:
        policy, reference: ``[B, 1+K]`` summed answer log-probs (column 0 chosen).
        beta: temperature β; the default 1 is shared with :func:`sdpo_loss` (S-DPO's value), while
            :func:`dpo_loss` defaults to DPO's 0.1 (module docstring, "β defaults").
        negative_mask: optional ``[B, K]`` bool, False marks padding negatives.
        chosen_nll: optional ``[B]`` negative log-likelihood of the chosen answer under the policy, with
            gradient. Which normalisation is up to the caller; the DMPO reference code uses the
            **per-token mean** (−log πθ(y_w|x) / |y_w|), which :func:`chosen_nll` computes by default.
            ``None`` disables the term.
        nll_weight: λ, the weight of the NLL term (1 in the reference code).
    """
    mask = _check_inputs(policy, reference, negative_mask)
    r = _rewards(policy, reference, beta)
    neg_mean = _masked_mean(r[:, 1:], mask)
    losses = F.softplus(neg_mean - r[:, 0])
    if chosen_nll is not None:
        if chosen_nll.shape != losses.shape:
            raise ValueError(f"chosen_nll must be [B] = {tuple(losses.shape)}, got {tuple(chosen_nll.shape)}")
        losses = losses + nll_weight * chosen_nll.to(losses.dtype)
    return _diagnostics(losses, r, mask)


def chosen_nll(
    policy_chosen: torch.Tensor, n_tokens_chosen: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """NLL of the chosen answer from its summed log-prob: per-token ``"mean"`` (default) or ``"sum"``.

    The per-token mean matches the DMPO reference implementation (an SFT loss averaged over the answer's
    tokens), which keeps λ comparable across titles of different lengths.
    """
    if reduction == "sum":
        return -policy_chosen
    if reduction == "mean":
        return -policy_chosen / n_tokens_chosen.to(policy_chosen.dtype).clamp_min(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


LOSSES = {"dpo": dpo_loss, "sdpo": sdpo_loss, "dmpo": dmpo_loss}


def preference_loss(name: str, policy: torch.Tensor, reference: torch.Tensor, **kwargs) -> PreferenceOutput:
    """Dispatch by name (``"dpo"``, ``"sdpo"``, ``"dmpo"``); keyword arguments go to the loss.

    Pass ``beta`` explicitly: the default β is each loss's own (0.1 for ``"dpo"``, 1 for ``"sdpo"`` and
    ``"dmpo"``; module docstring, "β defaults"), so the same call with a different name would otherwise
    also change the temperature.
    """
    try:
        fn = LOSSES[name]
    except KeyError:
        raise RecalignInputError(
            f"unknown preference loss {name!r} (choose from {', '.join(LOSSES)})", field="loss"
        ) from None
    return fn(policy, reference, **kwargs)
