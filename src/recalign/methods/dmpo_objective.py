"""DMPO's training objective over pair-ranking prompts (DMPO or S-DPO, K prompts per row).

Used by the few-shot recipe (:mod:`recalign.methods.dmpo_fewshot`, which re-exports it) on the rows of
:func:`recalign.methods.dmpo_prompts.pair_ranking_rows`; the losses themselves are
:func:`recalign.objectives.preference.preference_loss`.
"""

from __future__ import annotations


class PairRankingObjective:
    """DMPO / S-DPO over the K pair-ranking prompts of each row (:mod:`recalign.methods.dmpo_fewshot`, step 2).

    ``batch["prompt"]``: per row, K prompts; ``batch["answers"]``: per row, K ``[chosen, rejected]``;
    ``batch["ref"]``: ``[B, K, 2]`` reference log-probs. The row's policy and reference vectors are
    ``[mean_i chosen_i, rejected_1..K]``, fed to :func:`recalign.objectives.preference.preference_loss`:
    DMPO's ``-log σ(β r̄_w - (β/K) Σ r_i)`` is then exactly the mean margin of the K prompts.
    """

    def __init__(self, loss: str, beta: float, nll_weight: float = 0.0, impl: str = "packed") -> None:
        self.loss, self.beta, self.nll_weight, self.impl = loss, beta, nll_weight, impl

    def __call__(self, model, batch: dict):
        import torch

        from recalign.lm.scoring import answer_logprobs
        from recalign.objectives.preference import preference_loss

        k = len(batch["prompt"][0])
        if any(len(p) != k for p in batch["prompt"]):
            raise ValueError("every row of a batch needs the same number of pair prompts")
        prompts = [p for row in batch["prompt"] for p in row]
        answers = [a for row in batch["answers"] for a in row]
        scores = answer_logprobs(model, prompts, answers, impl=self.impl)
        b = len(batch["prompt"])
        pol = scores.sum[:, :2].reshape(b, k, 2)
        ref = torch.as_tensor(batch["ref"]).to(pol.dtype).to(pol.device).reshape(b, k, 2)
        policy = torch.cat([pol[:, :, 0].mean(dim=1, keepdim=True), pol[:, :, 1]], dim=1)
        reference = torch.cat([ref[:, :, 0].mean(dim=1, keepdim=True), ref[:, :, 1]], dim=1)
        kwargs: dict = {"beta": self.beta}
        if self.loss == "dmpo" and self.nll_weight > 0:
            n_tok = scores.n_tokens[:, 0].reshape(b, k).to(pol.dtype).clamp_min(1)
            kwargs["chosen_nll"] = (-pol[:, :, 0] / n_tok).mean(dim=1)
            kwargs["nll_weight"] = self.nll_weight
        out = preference_loss(self.loss, policy, reference, **kwargs)
        return out.loss, out.metrics()


__all__ = ["PairRankingObjective"]
