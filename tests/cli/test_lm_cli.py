"""``recalign sft / evaluate / recommend`` end to end on a tiny Llama and a tiny ML-100K-format directory.

One module-scoped SFT run (a few steps) provides the saved model the other commands load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmcli")
    data = _lm_tiny.write_ml100k_dir(root / "ml")
    model = _lm_tiny.write_tiny_model(root / "model")
    cfg = root / "sft.yaml"
    cfg.write_text(
        f"model: {model}\n"
        f"data: {{dataset: ml-100k, path: {data}, split: llara, candidates: 5}}\n"
        "n_train: 16\nmax_history: 4\ndtype: float32\n"
        "training: {max_steps: 2, batch_size: 4, save_steps: 2, progress: false, learning_rate: 0.01}\n"
        "eval: {n_test: 4, protocols: [candidates], max_new_tokens: 4}\n"
    )
    out = root / "run"
    assert main(["sft", "--config", str(cfg), "--output", str(out), "lora.target_modules=all-linear"]) == 0
    return root, data, model, cfg, out


def test_sft_cli_writes_run_and_refuses_unknown_keys(run, capsys):
    root, _, _, cfg, out = run
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "lora:" in (out / "config.yaml").read_text()
    assert [r.method for r in read_records(out / "records.json")] == ["sft"]
    capsys.readouterr()
    assert main(["sft", "--config", str(cfg), "--output", str(root / "x"), "training.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown key 'training.lr'" in err and "\n" not in err
    # the same output dir without --resume is refused; with --resume it continues (already finished)
    assert main(["sft", "--config", str(cfg), "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_evaluate_writes_records(run, tmp_path):
    _, data, _, _, out = run
    dest = tmp_path / "eval"
    code = main(
        ["evaluate", "--model", str(out), "--dataset", "ml-100k", "--path", str(data), "--split", "llara",
         "--candidates", "5", "--n-test", "5", "--protocols", "candidates,generation",
         "--max-new-tokens", "4", "--output", str(dest)]
    )  # fmt: skip
    assert code == 0
    records = read_records(dest / "records.json")
    assert [(r.protocol, r.method, r.n_examples) for r in records] == [
        ("candidates", "sft", 5),
        ("generation", "sft", 5),
    ]
    assert 0.0 <= records[0].metrics["HR@1"] <= 1.0 and "ValidRatio" in records[1].metrics
    assert records[0].command.startswith("recalign evaluate --model ")  # the exact command, for results
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["run"]["n_test"] == 5


def test_recommend_ranks_k_titles(run, capsys):
    _, data, _, _, out = run
    capsys.readouterr()
    code = main(
        [
            "recommend",
            "--model",
            str(out),
            "--history",
            "Toy Story (1995)",
            "fargo (1996)",
            "-k",
            "4",
            "--json",
        ]
    )
    assert code == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in recs] == [1, 2, 3, 4]
    titles = [r["title"] for r in recs]
    assert len(set(titles)) == 4 and set(titles) <= set(_lm_tiny.TITLES)
    assert not {"Toy Story (1995)", "Fargo (1996)"} & set(titles)  # history excluded
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)
    # with candidates: only those, ranked
    code = main(
        ["recommend", "--model", str(out), "--history", "Heat (1995)", "--candidates", "Jaws (1975)",
         "Rocky (1976)", "Babe (1995)", "-k", "10", "--json"]
    )  # fmt: skip
    assert code == 0
    assert {r["title"] for r in json.loads(capsys.readouterr().out)} == {
        "Jaws (1975)",
        "Rocky (1976)",
        "Babe (1995)",
    }


def test_recommend_rejects_unknown_title(run, capsys):
    _, _, _, _, out = run
    capsys.readouterr()
    assert main(["recommend", "--model", str(out), "--history", "Toy Stroy (1995)"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown history title 'Toy Stroy (1995)'" in err and "Toy Story (1995)" in err
    assert "\n" not in err


def test_quickstart_runs_stages_on_shared_examples_and_resumes(run, tmp_path, capsys):
    _, data, model, _, _ = run
    out = tmp_path / "qs"
    results = tmp_path / "results.json"
    args = [
        "quickstart", "--output", str(out), "--results", str(results), f"model={model}", "dtype=float32",
        f"data.path={data}", "data.candidates=5", "baselines=[pop]", "n_train=8", "max_history=4",
        "training.max_steps=1", "training.batch_size=4", "training.warmup_steps=0", "training.progress=false",
        "eval.n_test=4", "eval.protocols=[candidates,generation]", "eval.max_new_tokens=4",
    ]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    records = read_records(results)
    assert [(r.method, r.protocol) for r in records] == [
        ("pop", "candidates"),
        ("zeroshot", "candidates"),
        ("zeroshot", "generation"),
        ("sft", "candidates"),
        ("sft", "generation"),
    ]
    assert {r.n_examples for r in records} == {4}  # every method on the same test rows
    assert all(r.command == records[0].command for r in records)
    assert "| pop" in table and "| sft" in table
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    # a second run into the same directory needs --resume, which reads finished stages back
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    before = (out / "stages" / "sft.json").read_text()
    assert main([*args, "--resume"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert (out / "stages" / "sft.json").read_text() == before
