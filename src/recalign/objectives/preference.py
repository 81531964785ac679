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
``softplus(logsumexp_i(β(r_i − r_w)))``: logsumexp subtracts the maximum before exponentiating and softplus
switches to the identity for large inputs, so the loss and its gradient stay finite for reward gaps of
thousands. For K = 1, logsumexp of one element is that element, so S-DPO is *bit-for-bit* DPO
(``softplus(β(r_1 − r_w))`` is exactly −log σ(β(r_w − r_1))).

DMPO. The released DMPO code passes the chosen reference log-probs in place of the rejected ones, so the
reference terms cancel and the loss silently becomes reference-free; here the reference of every
negative is used, as in the paper. Its negatives are averaged *inside* the sigmoid (one comparison of the
positive against the mean negative), not turned into K independent pairs.

A variable number of negatives per row is supported through ``negative_mask`` (``[B, K]`` bool, True for
a real negative, False for padding). Every row must keep at least one real negative: a row with none
has no preference to learn from and is a data bug, so it raises instead of contributing a silent zero.

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


def _diagnostics(losses: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> PreferenceOutput:
    r = rewards.detach()
    chosen = r[:, 0]
    neg = r[:, 1:]
    maskf = mask.to(r.dtype)
    rejected_mean = (neg * maskf).sum(dim=1) / maskf.sum(dim=1)
    # chosen must beat every *real* negative; padded slots can never block it.
    neg_max = neg.masked_fill(~mask, float("-inf")).amax(dim=1)
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
        beta: temperature β (> 0): how far the policy may move from the reference.
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
    """Softmax DPO: L = log(1 + Σ_i exp(β(r_i − r_w))), computed as softplus(logsumexp(·)).

    Equivalent to −log σ(−log Σ_i exp(β(r_i − r_w))): the positive competes against all K negatives at
    once through a softmax over implicit rewards. K = 1 reduces exactly to :func:`dpo_loss`.

    Args:
        policy, reference: ``[B, 1+K]`` summed answer log-probs (column 0 chosen).
        beta: temperature β; the S-DPO reference scripts use β = 1.
        negative_mask: optional ``[B, K]`` bool, False marks padding negatives (excluded from the sum).
    """
    mask = _check_inputs(policy, reference, negative_mask)
    r = _rewards(policy, reference, beta)
    gaps = (r[:, 1:] - r[:, :1]).masked_fill(~mask, float("-inf"))
    losses = F.softplus(torch.logsumexp(gaps, dim=1))
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
    the mean over the row's real negatives). The optional SFT term keeps the chosen answer likely.

    Args:
        policy, reference: ``[B, 1+K]`` summed answer log-probs (column 0 chosen).
        beta: temperature β.
        negative_mask: optional ``[B, K]`` bool, False marks padding negatives.
        chosen_nll: optional ``[B]`` negative log-likelihood of the chosen answer under the policy, with
            gradient. Which normalisation is up to the caller; the DMPO reference code uses the
            **per-token mean** (−log πθ(y_w|x) / |y_w|), which :func:`chosen_nll` computes by default.
            ``None`` disables the term.
        nll_weight: λ, the weight of the NLL term (1 in the reference code).
    """
    mask = _check_inputs(policy, reference, negative_mask)
    r = _rewards(policy, reference, beta)
    maskf = mask.to(r.dtype)
    neg_mean = (r[:, 1:] * maskf).sum(dim=1) / maskf.sum(dim=1)
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
    """Dispatch by name (``"dpo"``, ``"sdpo"``, ``"dmpo"``); keyword arguments go to the loss."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise RecalignInputError(
            f"unknown preference loss {name!r} (choose from {', '.join(LOSSES)})", field="loss"
        ) from None
    return fn(policy, reference, **kwargs)
