"""The whole path on tiny models of both families: generate tasks -> LoRA SFT a few steps -> evaluate.

Also: the adapter written to disk reproduces the in-memory model's scores, the CLI writes the promised
files, and the config rejects what it cannot run.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from knowledge_tinylog import LOG, TITLES

from recalign.cli.main import main
from recalign.config import load_config
from recalign.errors import RecalignInputError
from recalign.evaluation.records import read_records
from recalign.lm.lora import load_adapter
from recalign.methods import PreparedData
from recalign.methods.knowledge.evaluation import TaskScorer
from recalign.methods.knowledge.recipe import KnowledgeConfig, run_knowledge

FAST = [
    "training.max_steps=2",
    "training.batch_size=3",
    "training.learning_rate=0.01",
    "training.progress=false",
    "training.logging_steps=1",
    "eval.tasks=[retrieval,ranking,rating,next_item,generation]",
    "eval.max_new_tokens=12",
    "tiny_hidden=32",
]


def _load_base(kind, base_dir):
    from transformers import AutoTokenizer

    from recalign.lm.loading import load_model
    from recalign.lm.seq2seq import load_seq2seq

    if kind == "tiny-t5":
        return load_seq2seq(base_dir)
    model, _ = load_model(base_dir)
    return model, AutoTokenizer.from_pretrained(base_dir)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5"])
def test_full_path_both_families(kind, tiny, tmp_path):
    ds, split = tiny
    cfg = load_config(KnowledgeConfig, overrides=[f"model={kind}", *FAST])
    res = run_knowledge(cfg, tmp_path / "run", data=PreparedData(ds, split), command="pytest", progress=False)

    assert res.train_steps == 2 and np.isfinite(res.train_loss)
    assert res.task_counts == {"mim": 1, "mlm": 1, "bpr": 1, "retrieval": 1, "ranking": 1, "rating": 1}
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "records.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    records = read_records(out / "records.json")
    by_task = {r.extra["task"]: r for r in records}
    assert set(by_task) == {"retrieval", "ranking", "rating", "next_item", "generation"}
    assert by_task["retrieval"].protocol == "full" and by_task["ranking"].protocol == "candidates"
    assert all(r.method == "knowledge-rec+aux" and r.command == "pytest" for r in records)
    # the ranking task trained on the prompt shape it is evaluated with (the split's candidates)
    for r in records:
        assert r.extra["train_candidates"] == r.extra["eval_candidates"] == split.n_candidates
        assert r.extra["history_len"] == cfg.history_len and r.extra["rec_form"] == "informative"
    n_test = len(split.stage("test"))
    assert by_task["ranking"].n_examples == n_test == 3
    for r in records:
        for k, v in r.metrics.items():
            if k.startswith(("HR", "NDCG", "MRR", "AUC", "Valid", "Accuracy")):
                assert 0.0 <= v <= 1.0, (r.extra["task"], k, v)
    assert 0 <= by_task["rating"].metrics["MAE"] <= 4
    # with 3 candidates, NDCG@K for K > 3 is not reported; retrieval ranks the 7-item catalogue
    assert "HR@5" not in by_task["ranking"].metrics and "HR@5" in by_task["retrieval"].metrics
    flat = json.loads((out / "metrics.json").read_text())["metrics"]
    assert flat["ranking/HR@1"] == by_task["ranking"].metrics["HR@1"]

    # the saved adapter on the saved base reproduces the trained model's scores
    base, tok = _load_base(kind, str(out / "base"))
    reloaded = load_adapter(base, out / "adapter").merge_and_unload().eval()
    prompt = "A user watched: Alien (1979). Which movie will the user watch next? Answer:"
    got = TaskScorer(reloaded, tok).score([prompt], [list(TITLES.values())])
    untrained, _ = _load_base(kind, str(out / "base"))
    before = TaskScorer(untrained.eval(), tok).score([prompt], [list(TITLES.values())])
    assert not np.allclose(got, before, atol=1e-4)  # training changed the scores
    ranks = pd.Series(got[0]).rank(ascending=False)
    assert len(ranks) == len(TITLES)


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path, capsys):
    csv = tmp_path / "log.csv"
    pd.DataFrame(LOG, columns=["user", "item", "timestamp", "rating"]).to_csv(csv, index=False)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item": list(TITLES), "title": list(TITLES.values())}).to_csv(items, index=False)
    data = [
        "data.dataset=csv",
        f"data.path={csv}",
        "data.candidates=3",
        f"data.options={{rating_col: rating, items: {items}}}",
    ]
    common = ["--output", str(tmp_path / "cli"), "model=tiny-llama", *FAST, "eval.tasks=[ranking]", *data]
    code = main(["knowledge", "--tasks", "mim,bpr,retrieval,ranking", "--ratios", "1,1,2,2", *common])
    assert code == 0
    out = capsys.readouterr().out
    assert "knowledge-rec+mim+bpr: 2 steps on 6 examples" in out
    cfg = (tmp_path / "cli" / "config.yaml").read_text()
    assert "- mim\n- bpr\n- retrieval\n- ranking" in cfg
    assert read_records(tmp_path / "cli" / "records.json")[0].method == "knowledge-rec+mim+bpr"

    # a second run into the same directory is refused without --resume (exit code 2, one line)
    assert main(["knowledge", "--tasks", "mim,ranking", *common]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and err.count("\n") == 1
    assert main(["knowledge", "--tasks", "mim,nope", "--output", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["knowledge", "--tasks", "mim", "--ratios", "1,2", "--output", str(tmp_path / "x")]) == 2
    assert "1 tasks but 2 ratios" in capsys.readouterr().err
    assert main(["knowledge", "--output", str(tmp_path / "x"), "eval.tasks=[full]"]) == 2
    assert "unknown evaluation 'full'" in capsys.readouterr().err
    assert main(["knowledge", "--output", str(tmp_path / "x"), "trianing.max_steps=3"]) == 2
    assert "unknown key 'trianing'" in capsys.readouterr().err


def test_method_names_and_budget():
    def cfg(tasks, ratios, **kw):
        return KnowledgeConfig(tasks=tasks, ratios=ratios, **kw)

    assert cfg(["retrieval", "ranking", "rating"], [1, 1, 1]).method_name() == "knowledge-rec"
    assert cfg(["mim", "mlm", "bpr", "retrieval"], [1, 1, 1, 1]).method_name() == "knowledge-rec+aux"
    assert cfg(["mim", "ranking"], [1, 1]).method_name() == "knowledge-rec+mim"
    assert cfg(["mim", "bpr", "ranking"], [1, 0, 1]).method_name() == "knowledge-rec+mim"  # zero ratio = off
    assert cfg(["mim", "mlm"], [1, 1]).method_name() == "knowledge-aux"
    c = cfg(["ranking"], [1])
    c.training.max_steps, c.training.batch_size, c.training.grad_accum = 5, 4, 2
    assert c.budget() == 40
    # batch_size is per process: the default budget is one pass at the global batch
    assert c.budget(world_size=2) == 80
    c.n_examples = 7
    assert c.budget() == c.budget(world_size=2) == 7
    with pytest.raises(RecalignInputError, match="train_candidates"):
        cfg(["ranking"], [1], train_candidates=1).validate()
    assert torch.get_num_threads() >= 1


def test_rec_form_ids_trains_and_evaluates_in_the_same_form(tiny, tmp_path):
    ds, split = tiny
    over = [o for o in FAST if not o.startswith("eval.tasks")]
    cfg = load_config(
        KnowledgeConfig,
        overrides=["model=tiny-llama", *over, "eval.tasks=[ranking,retrieval]", "rec_form=ids",
                   "tasks=[retrieval,ranking]", "ratios=[1,1]"],
    )  # fmt: skip
    res = run_knowledge(cfg, tmp_path / "run", data=PreparedData(ds, split), command="pytest", progress=False)
    assert res.task_counts == {"retrieval": 3, "ranking": 3}
    assert {r.extra["rec_form"] for r in res.records} == {"ids"}
    assert {r.extra["task"] for r in res.records} == {"ranking", "retrieval"}
