"""Task generators on the hand-written log in conftest.py: exact prompts and answers.

The log (titles in conftest.TITLES): u1 = Alien, Heat, Toy Story, Usual Suspects, Fargo (ratings 5 3 4 2 1);
u2 = Toy Story, Babe, Alien, Heat; u3 = Casablanca, Babe, Fargo. Under ``loo`` the training examples
are u1 at positions 1 and 2 and u2 at position 1 (u3 has only valid/test), so every expected string
below can be checked by reading the log.
"""

import numpy as np
import pytest

from recalign.errors import RecalignInputError
from recalign.lm.prompts import get_templates
from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions, format_rating
from recalign.methods.knowledge.templates import ALL_TASKS, n_templates


def _by_key(examples):
    return {(e.user, e.position): e for e in examples}


@pytest.fixture
def kt(tiny):
    ds, split = tiny
    return KnowledgeTasks(ds, split, TaskOptions(history_len=3, n_candidates=3, seed=0))


def test_every_task_has_several_registered_phrasings_ending_with_the_marker():
    for task in ALL_TASKS:
        assert n_templates(task) >= 2
        assert all(t.text.endswith("Answer:") for t in get_templates(f"knowledge_{task}"))


def test_training_data_comes_from_the_train_stage_only(kt):
    for task in ALL_TASKS:
        keys = {(e.user, e.position) for e in kt.generate(task)}
        assert keys == {(0, 1), (0, 2), (1, 1)}, task  # u3 (index 2) has no training example
    # u1's valid/test targets (Usual Suspects, Fargo) never appear in u1's training prompts or answers
    for task in ALL_TASKS:
        for e in kt.generate(task):
            if e.user == 0:
                assert "Usual Suspects" not in e.prompt + e.answer and "Fargo" not in e.prompt + e.answer


def test_mim_exact(kt):
    ex = _by_key(kt.generate("mim"))
    assert (
        ex[(0, 1)].prompt
        == "History with one movie masked: Alien (1979); [MASK]. Name the masked movie. Answer:"
    )
    assert ex[(0, 1)].answer == "Heat (1995)"
    assert ex[(0, 2)].prompt == (
        "Fill in the missing movie ([MASK]) in this sequence: Alien (1979); [MASK]; Toy Story (1995). Answer:"
    )
    assert ex[(0, 2)].answer == "Heat (1995)"
    assert (
        ex[(1, 1)].prompt
        == "Fill in the missing movie ([MASK]) in this sequence: Toy Story (1995); [MASK]. Answer:"
    )
    assert (ex[(1, 1)].answer, ex[(1, 1)].target) == ("Babe (1995)", 5)


def test_mlm_exact(kt):
    ex = _by_key(kt.generate("mlm"))
    assert ex[(0, 1)].prompt == "Fill in each [MASK] in the titles: [MASK] (1979); Heat (1995). Answer:"
    assert ex[(0, 1)].answer == "Alien"
    assert ex[(0, 2)].prompt == (
        "Some words in these movie titles are masked: Alien (1979); Heat (1995); [MASK] Story (1995). "
        "Which words are masked, in order? Answer:"
    )
    assert ex[(0, 2)].answer == "Toy"


def test_mlm_masks_several_words_in_order_and_never_the_year(tiny):
    ds, split = tiny
    kt = KnowledgeTasks(ds, split, TaskOptions(history_len=3, mlm_rate=1.0, mlm_max_words=10))
    e = kt.example("mlm", split.stage("train").iloc[1], template=1)  # u1 @2: Alien; Heat; Toy Story
    assert (
        e.prompt
        == "Fill in each [MASK] in the titles: [MASK] (1979); [MASK] (1995); [MASK] [MASK] (1995). Answer:"
    )
    assert e.answer == "Alien, Heat, Toy, Story"


def test_bpr_exact_and_negative_never_taken(kt, tiny):
    ds, _ = tiny
    ex = _by_key(kt.generate("bpr"))
    assert ex[(0, 1)].prompt == (
        "History: Alien (1979). Of Heat (1995) and Casablanca (1942), which movie does the user prefer? Answer:"
    )
    assert ex[(0, 1)].answer == "Heat (1995)"
    assert ex[(1, 1)].prompt == (
        "A user watched: Toy Story (1995). Which will they watch next: Babe (1995) or Fargo (1996)? Answer:"
    )
    assert ex[(1, 1)].answer == "Babe (1995)"
    seqs = ds.sequences()
    for e in ex.values():
        (neg,) = [c for c in e.candidates if c != e.target]
        assert neg not in set(seqs[e.user].tolist())


def test_retrieval_exact(kt):
    ex = _by_key(kt.generate("retrieval"))
    assert ex[(0, 1)].prompt == "A user watched: Alien (1979). Which movie will the user watch next? Answer:"
    assert ex[(0, 1)].answer == "Heat (1995)"
    assert (
        ex[(0, 2)].prompt == "Given the movies Alien (1979); Heat (1995), recommend the next movie. Answer:"
    )
    assert ex[(0, 2)].answer == "Toy Story (1995)"


def test_ranking_exact_uses_the_shared_candidates(kt, tiny):
    _, split = tiny
    ex = _by_key(kt.generate("ranking"))
    assert ex[(0, 1)].prompt == (
        "A user watched: Alien (1979). Rank these candidates and give the most likely next one: "
        "Casablanca (1942); Babe (1995); Heat (1995). Answer:"
    )
    assert ex[(0, 1)].answer == "Heat (1995)"
    train = split.stage("train")
    assert ex[(0, 1)].candidates == train["candidates"].iloc[0].tolist()


def test_rating_exact(kt):
    ex = _by_key(kt.generate("rating"))
    assert ex[(0, 2)].prompt == (
        "A user rated: Alien (1979): 5; Heat (1995): 3. How many stars (1-5) will they give Toy Story (1995)? Answer:"
    )
    assert (ex[(0, 2)].answer, ex[(0, 2)].rating) == ("4", 4.0)
    assert (
        ex[(1, 1)].prompt
        == "Ratings so far: Toy Story (1995): 4. Predict the rating (1-5) of Babe (1995). Answer:"
    )
    assert ex[(1, 1)].answer == "5"


def test_evaluation_stage_examples(kt):
    (e,) = [x for x in kt.generate("retrieval", stage="test") if x.user == 0]
    assert e.answer == "Fargo (1996)"
    assert "Usual Suspects, The (1995)" in e.prompt  # the test history includes the valid item


def test_rating_rounding():
    assert [format_rating(r) for r in (0.2, 1.0, 2.5, 3.49, 4.5, 7)] == ["1", "1", "3", "3", "5", "5"]


def test_seeded_and_order_independent(tiny):
    ds, split = tiny
    a = KnowledgeTasks(ds, split, TaskOptions(seed=3))
    b = KnowledgeTasks(ds, split, TaskOptions(seed=3))
    row = split.stage("train").iloc[2]
    for task in ALL_TASKS:
        first = [e.to_dict() for e in a.generate(task, 5)]
        assert first == [e.to_dict() for e in b.generate(task, 5)]
        # one example does not depend on what was generated before it
        assert (
            a.example(task, row).to_dict()
            == KnowledgeTasks(ds, split, TaskOptions(seed=3)).example(task, row).to_dict()
        )


def test_templates_vary_with_the_seed(tiny):
    ds, split = tiny
    row = split.stage("train").iloc[0]
    for task in ALL_TASKS:
        used = {KnowledgeTasks(ds, split, TaskOptions(seed=s)).example(task, row).template for s in range(30)}
        assert len(used) >= 2, task


def test_generate_cycles_the_pool_before_repeating(kt):
    ex = kt.generate("retrieval", 7)
    keys = [(e.user, e.position) for e in ex]
    assert len(set(keys[:3])) == 3 and len(set(keys[3:6])) == 3 and len(keys) == 7


def test_bad_requests_are_input_errors(kt, tiny):
    ds, split = tiny
    with pytest.raises(RecalignInputError, match="unknown task 'foo'"):
        kt.generate("foo")
    with pytest.raises(RecalignInputError, match="templates"):
        kt.example("mim", split.stage("train").iloc[0], template=9)
    unrated = ds.with_interactions(ds.interactions.assign(rating=np.nan))
    with pytest.raises(RecalignInputError, match="no ratings"):
        KnowledgeTasks(unrated, split).generate("rating")


def test_rec_form_ids_names_user_and_items_by_id_and_aux_tasks_keep_titles(tiny):
    from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions

    ds, split = tiny
    kt = KnowledgeTasks(ds, split, TaskOptions(rec_form="ids"))
    row = split.stage("test").iloc[0]
    ex = kt.example("ranking", row)
    assert ex.prompt.startswith(f"user_{ds.user_ids[int(row['user'])]}: ")
    assert ex.answer == kt.answer_names[ex.target] and ex.answer.startswith("item_i")
    assert all(kt.answer_names[c] in ex.prompt for c in ex.candidates)
    assert not any(t in ex.prompt for t in kt.titles)  # no title in the ids form
    assert kt.example("retrieval", row).answer.startswith("item_")
    assert kt.example("mim", row).answer in kt.titles  # auxiliary tasks stay in titles
    informative = KnowledgeTasks(ds, split).example("ranking", row)
    assert informative.answer in informative.prompt and "user_" not in informative.prompt
