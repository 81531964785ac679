"""``recalign baseline`` end to end on the synthetic chain data (registered as a dataset name)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from recalign.cli.main import main
from recalign.data.loaders.registry import DATASETS
from recalign.evaluation.protocols import evaluate_candidates
from recalign.evaluation.records import read_records
from recalign.testing import chain_data


@pytest.fixture()
def chains(monkeypatch):
    ds, split = chain_data("loo")
    monkeypatch.setitem(DATASETS, "chains", lambda **_: ds)
    return ds, split


def test_pop_run_writes_metrics_records_and_config(chains, tmp_path, capsys):
    ds, split = chains
    out = tmp_path / "pop"
    assert (
        main(["baseline", "--method", "pop", "--dataset", "chains", "--output", str(out), "--no-progress"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert {metrics[k] for k in ("method", "dataset", "split", "seed")} == {"pop", "chains", "loo", 0}
    assert metrics["seconds"] > 0 and "baseline" in metrics["command"]
    assert all(isinstance(v, str | int | float) for v in metrics.values())  # flat
    # the CLI's numbers are the protocol's numbers for the same model on the same split
    from recalign.baselines import make_baseline

    expected = evaluate_candidates(make_baseline("pop").fit(ds, split), split.stage("test"))
    assert metrics["candidates/HR@1"] == pytest.approx(expected["HR@1"])
    assert {"full/HR@10", "full/NDCG@10", "candidates/NDCG@5", "candidates/AUC"} <= set(metrics)
    recs = read_records(out / "records.json")
    assert [r.protocol for r in recs] == ["candidates", "full"]
    assert recs[1].metrics["HR@10"] == metrics["full/HR@10"] and recs[0].n_examples == len(
        split.stage("test")
    )
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"seed": 0, "smoothing": 0.0}
    assert "pop chains/loo/candidates" in capsys.readouterr().out


def test_overrides_and_yaml_reach_the_model(chains, tmp_path):
    cfg = tmp_path / "gru.yaml"
    cfg.write_text("epochs: 2\nhidden_size: 8\nthreads: 1\n")
    out = tmp_path / "gru"
    args = [
        "baseline",
        "--method",
        "gru4rec",
        "--dataset",
        "chains",
        "--config",
        str(cfg),
        "--output",
        str(out),
    ]
    assert main([*args, "--no-progress", "--seed", "3", "embedding_size=8", "early_stopping=false"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["hidden_size"], saved["embedding_size"], saved["seed"]) == (2, 8, 8, 3)
    assert saved["early_stopping"] is False
    fit = json.loads((out / "fit.json").read_text())
    assert fit["epochs_run"] == 2 and len(fit["history"]) == 2


def test_prepared_split_is_used_as_is(chains, tmp_path):
    ds, split = chains
    # A split with other candidate sets: the run must use these, not rebuild with --seed.
    from recalign.data.splits import build_split

    other = build_split(ds, "loo", seed=7)
    assert not np.array_equal(other.candidate_matrix("test"), split.candidate_matrix("test"))
    other.save(tmp_path / "prep")
    out = tmp_path / "run"
    argv = ["baseline", "--method", "pop", "--dataset", "chains", "--prepared", str(tmp_path / "prep")]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_seed"] == 7
    from recalign.baselines import make_baseline

    expected = evaluate_candidates(make_baseline("pop").fit(ds, other), other.stage("test"))
    assert metrics["candidates/HR@1"] == pytest.approx(expected["HR@1"])


def test_prepared_split_from_another_dataset_is_rejected(chains, tmp_path, monkeypatch, capsys):
    from recalign.data.splits import build_split
    from recalign.testing import chain_log, dataset_from_log

    other = dataset_from_log(chain_log(seed=5), 60)
    build_split(other, "loo", seed=0).save(tmp_path / "prep")
    argv = ["baseline", "--method", "pop", "--dataset", "chains", "--prepared", str(tmp_path / "prep")]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match dataset" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["epochs=3", "hidden=8"], "unknown key 'hidden'"),
        (["epochs=zero"], "expected an integer"),
        (["n_heads=3"], "not divisible"),
        (["hidden_dropout_prob=1.5"], "must be in [0, 1)"),
    ],
)
def test_bad_config_is_a_one_line_error(chains, tmp_path, capsys, extra, message):
    argv = ["baseline", "--method", "sasrec", "--dataset", "chains", "--output", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_config_lists_every_field_with_help(capsys):
    assert main(["baseline", "--method", "sasrec", "--help-config"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    import dataclasses

    from recalign.baselines import SASRecConfig

    assert len(lines) == len(dataclasses.fields(SASRecConfig))
    assert all(line.split(": ", 1)[1].strip() for line in lines)  # every field has a help text
