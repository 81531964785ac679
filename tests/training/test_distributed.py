"""recalign.training.distributed in a plain one-process run: every helper is the identity / a no-op
(the multi-process behaviour is exercised by tests/scale/)."""

import torch

from recalign.training import distributed


def test_one_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert not distributed.is_distributed()
    distributed.init()
    distributed.barrier()
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.all_gather(3) == [3]
    distributed.check_same("x", "anything")
    t = torch.ones(2)
    distributed.all_reduce_sum_([t])
    assert t.tolist() == [1.0, 1.0]
    ran = []
    with distributed.main_first():
        ran.append(1)
    assert ran == [1]
    assert distributed.digest([1, 2]) == distributed.digest([1, 2]) != distributed.digest([2, 1])


def test_rank_comes_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, 1, False)
