"""The gradient check both hybrid test files run: a fast scoring path against the naive one."""

from __future__ import annotations

import torch

from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs


def assert_grads_match_naive(model, prompts, answers, impl: str, tol: float) -> None:
    """Gradients of every weight *and* of the projector through ``impl`` equal the naive path's (to
    ``tol``), and the projector's four tensors get a non-zero gradient (they are not detached)."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    def grads(fn):
        model.zero_grad()
        s = fn()
        s.sum[s.mask].sum().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    ref = grads(lambda: naive_answer_logprobs(model, prompts, answers))
    got = grads(lambda: answer_logprobs(model, prompts, answers, impl=impl))
    proj = [n for n in ref if "recalign_item_tokens" in n]
    assert len(proj) == 4 and set(ref) == set(got)
    assert all(ref[n].abs().max() > 0 for n in proj)
    for n in ref:
        assert (ref[n] - got[n]).abs().max().item() <= tol, n
