"""Prompt templates and the one tokenisation rule."""

from __future__ import annotations

import numpy as np
import pytest

from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.lm.prompts import (
    ANSWER_MARKER,
    TASK_TEMPLATES,
    PromptExample,
    PromptTemplate,
    build_candidate_prompt,
    build_open_prompt,
    choose_template,
    display_titles,
    encode_answer,
    encode_prompt,
    end_of_turn_id,
    examples_to_prompts,
    get_templates,
    item_noun,
    register_template,
    resolve_template,
    stop_token_ids,
)


def test_every_template_ends_with_answer_marker_and_renders(tiny_dataset, titles):
    assert len(TASK_TEMPLATES["next_item"]) >= 3
    ds = tiny_dataset()
    for i, t in enumerate(get_templates("next_item")):
        p = build_candidate_prompt(ds, [0, 1, 2], [3, 4, 5], template=i)
        assert p == build_candidate_prompt(ds, [0, 1, 2], [3, 4, 5], template=t.name)
        assert p.rstrip().endswith(ANSWER_MARKER)
        for title in (titles[0], titles[3], titles[5]):
            assert title in p
        assert "{" not in p  # no unfilled fields
    for t in get_templates("next_item_open"):
        p = build_open_prompt(ds, [0, 1], template=t)
        assert p.rstrip().endswith(ANSWER_MARKER) and titles[1] in p


def test_template_without_marker_is_refused():
    with pytest.raises(ValueError, match="answer marker"):
        PromptTemplate(name="bad", text="History: {history}. What next?")


def test_template_choice_is_deterministic_and_mixes_phrasings():
    picks = [choose_template(0, u, p)[0] for u in range(30) for p in range(10)]
    assert picks == [choose_template(0, u, p)[0] for u in range(30) for p in range(10)]
    counts = np.bincount(picks, minlength=len(get_templates()))
    assert (counts > 30).all()  # every phrasing is used, roughly uniformly
    other_seed = [choose_template(1, u, p)[0] for u in range(30) for p in range(10)]
    assert other_seed != picks


def test_history_is_last_ten_oldest_first_and_candidates_in_order(tiny_dataset):
    ds = tiny_dataset()
    hist = list(range(14))
    p = build_candidate_prompt(ds, hist, [20, 21, 22], template="next_item_predict")
    titles = display_titles(ds)
    shown = [titles[i] for i in hist[-10:]]
    for t in (titles[i] for i in hist[:4]):
        assert t not in p
    positions = [p.index(t) for t in shown]
    assert positions == sorted(positions)
    assert p.index(titles[20]) < p.index(titles[21]) < p.index(titles[22])
    short = build_candidate_prompt(ds, hist, [20], template="next_item_predict", max_history=2)
    assert titles[11] not in short and titles[12] in short and titles[13] in short


def test_examples_to_prompts_matches_split(tiny_dataset):
    ds = tiny_dataset()
    split = build_split(ds, "loo", n_candidates=5)
    test = split.stage("test")
    exs = examples_to_prompts(ds, test, seed=0)
    titles = display_titles(ds)
    assert len(exs) == len(test)
    for ex, (_, row) in zip(exs, test.iterrows()):
        assert isinstance(ex, PromptExample)
        assert ex.candidates == [titles[i] for i in row["candidates"]]
        assert ex.target == titles[row["target"]] and ex.target in ex.candidates
        assert (ex.user, ex.position) == (row["user"], row["position"])
        t = choose_template(0, ex.user, ex.position)[1]
        assert ex.prompt == build_candidate_prompt(
            ds, row["history"], row["candidates"], template=t, user=ex.user, position=ex.position
        )
        assert ex.prompt == build_candidate_prompt(
            ds, row["history"], row["candidates"], seed=0, user=ex.user, position=ex.position
        )
    no_cands = build_split(ds, "loo", n_candidates=5, stages_with_candidates=("test",)).stage("train")
    with pytest.raises(RecalignInputError, match="no candidates"):
        examples_to_prompts(ds, no_cands)


def test_display_titles_append_missing_year_and_nouns(tiny_dataset):
    ds = tiny_dataset("amazon-toys")
    ds.items["year"] = ["2001"] * len(ds.items)
    ds.items.loc[0, "title"] = "Plain Title"
    titles = display_titles(ds)
    assert titles[0] == "Plain Title (2001)"
    assert titles[1] == ds.items["title"][1] + " (2001)"
    assert item_noun(ds) == ("item", "items")
    assert item_noun(tiny_dataset("ml-100k")) == ("movie", "movies")
    # a title that already carries its year is left alone
    ds.items.loc[2, "title"] = "Heat (2001)"
    assert display_titles(ds)[2] == "Heat (2001)"


def test_registry_accepts_new_tasks():
    t = PromptTemplate(name="pair_a", text="Rank {a} and {b}.\n" + ANSWER_MARKER)
    register_template("pairwise_test", t)
    try:
        assert resolve_template("pair_a", task="pairwise_test") is t
        assert resolve_template(None, user=3, task="pairwise_test") is t
        with pytest.raises(ValueError, match="already"):
            register_template("pairwise_test", t)
    finally:
        TASK_TEMPLATES.pop("pairwise_test")
    with pytest.raises(RecalignInputError, match="unknown prompt task"):
        get_templates("nope")
    with pytest.raises(RecalignInputError, match="unknown template"):
        resolve_template("nope")


# ---------------------------------------------------------------------- tokenisation
def test_plain_tokenizer_rule(tiny_tokenizer):
    tok = tiny_tokenizer
    p = encode_prompt(tok, "Watched Heat (1995).\nAnswer:")
    a = encode_answer(tok, "Fargo (1996)")
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    assert a[-1] == tok.eos_token_id and tok.eos_token_id not in a[:-1]
    assert tok.bos_token_id not in a
    assert tok.decode(p + a, skip_special_tokens=True) == "Watched Heat (1995).\nAnswer: Fargo (1996)"
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_chat_tokenizer_rule(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end != tok.eos_token_id
    p = encode_prompt(tok, "Pick one.\nAnswer:")
    a = encode_answer(tok, "Heat (1995)")
    text = tok.decode(p)
    assert text.startswith("<|im_start|>user\nPick one.\nAnswer:<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert a[-1] == im_end and tok.decode(a[:-1]) == "Heat (1995)"
    assert set(stop_token_ids(tok)) == {im_end, tok.eos_token_id}


@pytest.mark.slow
def test_smollm2_tokenisation_is_chatml():
    from recalign.lm.loading import load_tokenizer

    tok = load_tokenizer("smollm2")
    p = encode_prompt(tok, "Which movie?\nAnswer:")
    a = encode_answer(tok, "Heat (1995)")
    assert tok.decode(p).endswith(
        "<|im_start|>user\nWhich movie?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.convert_ids_to_tokens(a[-1]) == "<|im_end|>"
    assert tok.decode(a[:-1]) == "Heat (1995)"


def test_item_fields_extend_prompt_listing_but_not_answers(tiny_dataset):
    ds = tiny_dataset()
    ds.items["genres"] = ["Animation|Comedy"] + [""] * (len(ds.items) - 1)
    split = build_split(ds, "loo", n_candidates=5)
    test = split.stage("test")
    plain = examples_to_prompts(ds, test)
    rich = examples_to_prompts(ds, test, item_fields=("genres", "no_such_field"))
    assert [e.candidates for e in rich] == [e.candidates for e in plain]  # answers unchanged
    assert [e.target for e in rich] == [e.target for e in plain]
    p = build_candidate_prompt(ds, [0, 1], [2, 3], template=0, item_fields=("genres",))
    assert "Toy Story (1995) [genres: Animation, Comedy]" in p
    assert "Heat (1995)\n" in p or "Heat (1995)" in p and "Heat (1995) [" not in p
    assert "[genres" not in build_candidate_prompt(ds, [0, 1], [2, 3], template=0)
