"""The ID tokenizer: atomic ID tokens beyond the word vocabulary, exact round trip."""

import pytest

from recalign.errors import RecalignInputError
from recalign.methods.cllm4rec.vocab import IDTokenizer


@pytest.fixture
def tok(base_tokenizer):
    return IDTokenizer(base_tokenizer, n_users=16, n_items=40)


@pytest.mark.parametrize(
    "text",
    [
        "<user_3> has interacted with <item_0> <item_39> <item_7>",
        "<user_15> writes the following review for <item_2>: Movie number 2 is great.",
        "<item_12> is titled Movie number 12 (1992); genres: Drama, Horror",
        "<user_0> has interacted with <item_5>; the user will interact with:",
        "plain words only, no ids",
        "two  spaces before <item_1> and after  <item_2>  end",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text


def test_id_tokens_are_atomic_and_beyond_the_vocab(tok, base_tokenizer):
    ids = tok.encode("<user_3> has interacted with <item_0> <item_39>")
    v = len(base_tokenizer)
    assert ids[0] == v + 3  # users right after the words
    assert ids[-2:] == [v + 16 + 0, v + 16 + 39]  # items after the users, one id each, no space tokens
    assert all(i < v for i in ids[1:-2])  # the hard prompt is ordinary BPE
    assert tok.is_user(ids[0]) and tok.is_item(ids[-1]) and not tok.is_item(ids[1])
    assert tok.total_size == v + 16 + 40
    # BPE alone would have cut the ID into several word pieces
    assert len(base_tokenizer.encode("<item_39>", add_special_tokens=False)) > 1


def test_non_canonical_text_normalises(tok):
    assert tok.decode(tok.encode("(<item_1>)")) == "( <item_1>)"
    assert tok.encode("<item_1><item_2>") == tok.encode("<item_1> <item_2>")


def test_unknown_ids_are_rejected(tok):
    with pytest.raises(RecalignInputError, match="item index 40"):
        tok.encode("<item_40>")
    with pytest.raises(RecalignInputError, match="user index 16"):
        tok.encode("<user_16> hi")
