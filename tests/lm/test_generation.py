"""Generation protocol: answer matching, the two HR@1 conventions, batched greedy generation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recalign.evaluation.generation import generation_metrics, match_answer
from recalign.lm.generation import generate_answers
from recalign.lm.prompts import encode_prompt, stop_token_ids

CANDS = ["Alien (1979)", "Aliens (1986)", "Heat (1995)", "Star Wars (1977)", "Toy Story (1995)"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Heat (1995)", 2),
        ("heat (1995)", 2),  # case-insensitive
        ("I would recommend   Toy  Story (1995)!", 4),  # whitespace collapsed, surrounding text allowed
        ("The answer is: star wars (1977)\n", 3),
        ("Heat (1995) or Star Wars (1977)", None),  # two candidates: invalid
        ("Casablanca (1942)", None),  # no candidate
        ("", None),
        ("Heat", None),  # a partial title is not the title
        ("Heat (1995) Heat (1995)", 2),  # the same title twice is still one candidate
    ],
)
def test_match_answer(answer, expected):
    assert match_answer(answer, CANDS) == expected


def test_titles_inside_longer_titles():
    cands = ["Alien", "Aliens", "Heat", "Alien Resurrection"]
    assert match_answer("Aliens", cands) == 1  # "Alien" only occurs inside "Aliens"
    assert match_answer("Alien Resurrection", cands) == 3
    assert match_answer("Alien", cands) == 0
    assert match_answer("Alien, then Aliens", cands) is None  # "Alien" also occurs on its own
    assert match_answer("Aliens or Heat", cands) is None


def test_duplicate_titles_resolve_to_first():
    assert (
        match_answer("Chasing Amy (1997)", ["Heat (1995)", "Chasing Amy (1997)", "Chasing Amy (1997)"]) == 1
    )


def test_generation_metrics_conventions():
    matches = [0, 2, None, 1, None]
    targets = [0, 1, 3, 1, 0]
    m = generation_metrics(matches, targets)
    assert m["HR@1 (all)"] == pytest.approx(2 / 5)  # S-DPO: over all examples
    assert m["HR@1 (valid)"] == pytest.approx(2 / 3)  # LLaRA: over valid answers
    assert m["ValidRatio"] == pytest.approx(3 / 5)
    none_valid = generation_metrics([None, None], [0, 1])
    assert none_valid["HR@1 (all)"] == 0.0 and math.isnan(none_valid["HR@1 (valid)"])
    with pytest.raises(ValueError):
        generation_metrics([0], [0, 1])


def _sharp(model):
    """A copy with scaled-up weights, so greedy outputs vary instead of repeating one token."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


def _manual_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = encode_prompt(tok, prompt)
    stops = stop_token_ids(tok)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_left_padded_generation_equals_one_by_one_greedy(tiny_model, tiny_tokenizer):
    model = _sharp(tiny_model)
    prompts = ["Heat (1995)\nAnswer:", "Star Wars (1977), Toy Story (1995), Fargo (1996)\nAnswer:", "Alien"]
    got = generate_answers(model, tiny_tokenizer, prompts, batch_size=3, max_new_tokens=6, progress=False)
    want = [_manual_greedy(model, tiny_tokenizer, p, 6) for p in prompts]
    assert got == want
    assert len(set(want)) > 1 and all(want)  # a test that could fail: outputs differ and are non-empty


class _FakeLM(torch.nn.Module):
    """Returns fixed continuations, to test stopping and decoding."""

    def __init__(self, continuations):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.config = type("C", (), {"is_encoder_decoder": False})()

    def generate(self, input_ids, attention_mask, **kw):
        assert kw["do_sample"] is False
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the right edge
        width = max(len(c) for c in self.continuations)
        new = torch.full((len(input_ids), width), kw["pad_token_id"])
        for r, c in enumerate(self.continuations[: len(input_ids)]):
            new[r, : len(c)] = torch.tensor(c)
        return torch.cat([input_ids, new], dim=1)


def test_answers_stop_at_end_token(tiny_tokenizer):
    tok = tiny_tokenizer
    heat = tok.encode(" Heat (1995)", add_special_tokens=False)
    star = tok.encode(" Star Wars (1977)", add_special_tokens=False)
    fake = _FakeLM([heat + [tok.eos_token_id] + star, star])
    got = generate_answers(fake, tok, ["a", "a much longer prompt text"], batch_size=2, progress=False)
    assert got == ["Heat (1995)", "Star Wars (1977)"]
