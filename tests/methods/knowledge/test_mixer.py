from collections import Counter

import pytest

from recalign.errors import RecalignInputError
from recalign.methods.knowledge.mixer import allocate, mix
from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions


def test_allocate_exact_counts_by_largest_remainder():
    assert allocate(60, ["mim", "bpr", "retrieval", "ranking"], [1, 1, 2, 2]) == {
        "mim": 10, "bpr": 10, "retrieval": 20, "ranking": 20,
    }  # fmt: skip
    # 10 * (1/3, 1/3, 1/3) = 3.33 each: one extra goes to the first task (ties broken by order)
    assert allocate(10, ["mim", "mlm", "bpr"], [1, 1, 1]) == {"mim": 4, "mlm": 3, "bpr": 3}
    # 7 * (0.3, 0.2, 0.5) = 2.1, 1.4, 3.5: floors sum to 6, the one left goes to the largest remainder (.5)
    assert allocate(7, ["mim", "mlm", "ranking"], [0.3, 0.2, 0.5]) == {"mim": 2, "mlm": 1, "ranking": 4}
    for budget in range(0, 40):
        assert sum(allocate(budget, ["mim", "bpr", "rating"], [3, 5, 1]).values()) == budget
    assert allocate(5, ["mim", "retrieval"], [0, 1]) == {"mim": 0, "retrieval": 5}


@pytest.mark.parametrize(
    ("tasks", "ratios", "match"),
    [
        (["mim"], [1, 2], "1 tasks but 2 ratios"),
        (["mim", "nope"], [1, 1], "unknown task 'nope'"),
        (["mim", "mim"], [1, 1], "twice"),
        (["mim"], [0], "not all zero"),
        (["mim"], [-1], "non-negative"),
    ],
)
def test_allocate_rejects_bad_input(tasks, ratios, match):
    with pytest.raises(RecalignInputError, match=match):
        allocate(10, tasks, ratios)


def test_mix_has_exact_counts_is_seeded_and_shuffled(tiny):
    ds, split = tiny
    kt = KnowledgeTasks(ds, split, TaskOptions(n_candidates=3))
    a = mix(kt, ["mim", "bpr", "retrieval", "ranking"], [1, 1, 2, 2], 12, seed=5)
    assert Counter(e.task for e in a) == {"mim": 2, "bpr": 2, "retrieval": 4, "ranking": 4}
    b = mix(kt, ["mim", "bpr", "retrieval", "ranking"], [1, 1, 2, 2], 12, seed=5)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    c = mix(kt, ["mim", "bpr", "retrieval", "ranking"], [1, 1, 2, 2], 12, seed=6)
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]
    # the tasks are interleaved, not in blocks
    assert [e.task for e in a] != sorted(
        (e.task for e in a), key=["mim", "bpr", "retrieval", "ranking"].index
    )
