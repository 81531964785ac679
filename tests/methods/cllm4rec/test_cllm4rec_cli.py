"""``recalign cllm4rec`` end to end on files in the real ML-100K format and a tiny saved backbone."""

import json

import pytest
import yaml

from recalign.cli.main import main

N_GENRES = 19


@pytest.fixture(scope="module")
def files(tmp_path_factory, dataset, backbone, base_tokenizer):
    """``u.data`` / ``u.item`` of the tiny dataset (tab / pipe separated, Latin-1) and the tiny model."""
    root = tmp_path_factory.mktemp("cllm4rec_cli")
    data_dir = root / "ml"
    data_dir.mkdir()
    inter = dataset.interactions
    ids = dataset.items["item_id"].str[1:].astype(int) + 1  # "m0" -> 1
    users = [int(u[1:]) + 1 for u in dataset.user_ids]
    lines = [
        f"{users[u]}\t{ids[i]}\t4\t{t}" for u, i, t in zip(inter.user_idx, inter.item_idx, inter.timestamp)
    ]
    (data_dir / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    rows = []
    for k, row in dataset.items.iterrows():
        flags = ["1" if g == k % N_GENRES else "0" for g in range(N_GENRES)]
        rows.append("|".join([str(ids[k]), row["title"], "01-Jan-1995", "", "http://x", *flags]))
    (data_dir / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
    model_dir = root / "tiny"
    backbone.save_pretrained(model_dir, safe_serialization=True)
    base_tokenizer.save_pretrained(model_dir)
    config = root / "cllm4rec.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "threads": 1,
                "progress": False,
                "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "holdout"},
                "model": {"backbone": str(model_dir)},
                "pretrain": {
                    "collab_steps": 2,
                    "batch_size": 4,
                    "content_batch_size": 8,
                    "checkpoint_every": 1,
                },
                "finetune": {"steps": 2, "batch_size": 4, "checkpoint_every": 1},
            }
        )
    )
    return config


def test_run_writes_records_and_resumes(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["cllm4rec", "run", "--config", str(files), "--output", str(out)]) == 0
    for name in ("config.yaml", "pretrain.safetensors", "model.safetensors", "metrics.json", "records.json"):
        assert (out / name).is_file(), name
    recs = json.loads((out / "records.json").read_text())["records"]
    assert [(r["split"], r["protocol"], r["method"]) for r in recs] == [("holdout", "full", "cllm4rec")]
    assert {"Recall@20", "Recall@40", "NDCG@100"} <= set(recs[0]["metrics"]) and recs[0]["n_examples"] == 16
    steps = [json.loads(line)["step"] for line in (out / "progress.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 1, 2, 3, 4]  # 2 collab + 2 content, then 2 rec + 2 content steps
    capsys.readouterr()
    # a finished stage is skipped, not redone
    assert main(["cllm4rec", "pretrain", "--config", str(files), "--output", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
    # a different training setting may not continue in the same directory
    assert (
        main(["cllm4rec", "finetune", "--config", str(files), "--output", str(out), "finetune.lr=0.5"]) == 2
    )
    assert "finetune" in capsys.readouterr().err
    # evaluation settings may change
    assert (
        main(["cllm4rec", "evaluate", "--config", str(files), "--output", str(out), "eval.max_users=5"]) == 0
    )
    assert json.loads((out / "records.json").read_text())["records"][0]["n_examples"] == 5


def test_loo_split_gives_full_and_candidate_records(files, tmp_path):
    out = tmp_path / "loo"
    args = ["--config", str(files), "--output", str(out), "data.split=loo", "method=cllm4rec-no-content"]
    assert main(["cllm4rec", "run", *args, "pretrain.content_ratio=0"]) == 0
    recs = json.loads((out / "records.json").read_text())["records"]
    assert [(r["protocol"], r["method"]) for r in recs] == [
        ("full", "cllm4rec-no-content"),
        ("candidates", "cllm4rec-no-content"),
    ]
    assert "HR@10" in recs[0]["metrics"] and "HR@1" in recs[1]["metrics"]


def test_bad_input_is_a_one_line_error(files, tmp_path, capsys):
    assert (
        main(["cllm4rec", "pretrain", "--config", str(files), "--output", str(tmp_path), "pretrain.nope=1"])
        == 2
    )
    assert "unknown key 'pretrain.nope'" in capsys.readouterr().err
    assert main(["cllm4rec", "finetune", "--config", str(files), "--output", str(tmp_path / "empty")]) == 2
    assert "run 'recalign cllm4rec pretrain' first" in capsys.readouterr().err
    assert main(["cllm4rec", "pretrain", "--config", str(files)]) == 2
