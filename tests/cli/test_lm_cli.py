"""``recalign sft / evaluate / recommend`` end to end on a tiny Llama and a tiny ML-100K-format directory.

One module-scoped SFT run (a few steps) provides the saved model the other commands load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

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
    # candidates + generation shared one pass per prompt; --no-joint gives the same records separately
    assert all("joint" in r.extra for r in records)
    sep = tmp_path / "eval-separate"
    code = main(
        ["evaluate", "--model", str(out), "--dataset", "ml-100k", "--path", str(data), "--split", "llara",
         "--candidates", "5", "--n-test", "5", "--protocols", "candidates,generation",
         "--max-new-tokens", "4", "--no-joint", "--output", str(sep)]
    )  # fmt: skip
    assert code == 0
    separate = read_records(sep / "records.json")
    assert not any("joint" in r.extra for r in separate)
    for a, b in zip(records, separate):
        assert a.protocol == b.protocol
        assert json.dumps(a.metrics) == json.dumps(b.metrics)  # NaN-safe exact comparison
        assert a.extra.get("answers_sample") == b.extra.get("answers_sample")


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


def test_evaluate_pairwise_protocol_writes_a_record(run, tmp_path):
    """``--protocols pairwise``: DMPO's A-or-B prompt per (target, negative) pair, as a record; the
    numbers are exactly the API's on the same model, rows, prompt seed and history length."""
    _, data, _, _, out = run
    dest = tmp_path / "eval"
    code = main(
        ["evaluate", "--model", str(out), "--dataset", "ml-100k", "--path", str(data), "--split", "llara",
         "--candidates", "5", "--n-test", "3", "--protocols", "candidates,pairwise", "--max-pairs", "2",
         "--output", str(dest)]
    )  # fmt: skip
    assert code == 0
    records = read_records(dest / "records.json")
    assert [(r.protocol, r.method, r.n_examples) for r in records] == [
        ("candidates", "sft", 3),
        ("pairwise", "sft", 3),
    ]
    pair = records[1]
    assert pair.metrics["n_pairs"] == 6 and pair.extra["max_pairs"] == 2
    assert 0.0 <= pair.metrics["PairAcc"] <= 1.0
    assert (
        json.loads((dest / "metrics.json").read_text())["metrics"]["pairwise/PairAcc"]
        == pair.metrics["PairAcc"]
    )

    from recalign.data.prepare import DataPrepareConfig
    from recalign.lm.lora import load_lm
    from recalign.methods import load_data, sample_examples
    from recalign.methods.dmpo import pairwise_accuracy

    model, tok, _ = load_lm(out, dtype="auto")
    prepared = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data), split="llara", candidates=5))
    test = sample_examples(prepared.split.stage("test"), 3, 0, stage="test")
    direct = pairwise_accuracy(model, tok, prepared.dataset, test, seed=0, max_history=4, max_pairs=2)
    assert pair.metrics == pytest.approx(direct.metrics, abs=1e-6)
    # an unknown protocol is a one-line input error naming the choices
    assert main(["evaluate", "--model", str(out), "--dataset", "ml-100k", "--path", str(data),
                 "--protocols", "pairwize", "--output", str(tmp_path / "x")]) == 2  # fmt: skip


def test_quickstart_runs_stages_on_shared_examples_and_resumes(run, tmp_path, capsys):
    import math

    from safetensors.torch import load_file

    _, data, model, _, _ = run
    out = tmp_path / "qs"
    results = tmp_path / "results.json"
    args = [
        "quickstart", "--output", str(out), "--results", str(results), f"model={model}", "dtype=float32",
        f"data.path={data}", "data.candidates=5", "baselines=[pop]", "n_train=8", "max_history=4",
        "training.max_steps=1", "training.batch_size=4", "training.warmup_steps=0", "training.progress=false",
        "sdpo.n_train=8", "sdpo.training.max_steps=1", "sdpo.training.batch_size=4",
        "sdpo.training.warmup_steps=0", "sdpo.training.learning_rate=0.01", "sdpo.training.progress=false",
        "eval.n_test=4", "eval.protocols=[candidates,generation]", "eval.max_new_tokens=4", "format=candidates",
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
        ("sdpo", "candidates"),
        ("sdpo", "generation"),
    ]
    assert {r.n_examples for r in records} == {4}  # every method on the same test rows
    assert {r.seed for r in records} == {0}
    assert all(r.command == records[0].command for r in records)
    assert "| pop" in table and "| sft" in table and "| sdpo" in table
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()

    # sdpo: a new adapter trained on top of the SFT model (which is merged in and is the reference)
    sft_w = load_file(out / "sft" / "adapter" / "adapter_model.safetensors")
    sdpo_w = load_file(out / "sdpo" / "adapter" / "adapter_model.safetensors")
    assert sdpo_w.keys() < sft_w.keys()  # S-DPO adapts q/v; the SFT adapter every linear layer
    assert any(not torch.equal(sft_w[k], sdpo_w[k]) for k in sdpo_w)
    assert all(sdpo_w[k].abs().sum() > 0 for k in sdpo_w if "lora_B" in k)  # it trained (B starts at 0)
    meta = json.loads((out / "sdpo" / "metrics.json").read_text())["run"]
    assert meta["start_model"] == str(out / "sft") and meta["loss"] == "sdpo" and meta["negatives"] == 3
    assert meta["train_steps"] == 1 and meta["n_test"] == 4
    # step 0: the fresh adapter is the identity, every implicit reward is 0, so the loss is log(1 + K)
    assert meta["train_loss"] == pytest.approx(math.log(4), abs=1e-3)
    assert json.loads((out / "stages" / "sdpo.json").read_text())["artifacts"] == {"sdpo": str(out / "sdpo")}

    # a second run into the same directory needs --resume, which reads finished stages back
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    before = {s: (out / "stages" / f"{s}.json").read_text() for s in ("sft", "sdpo")}
    sdpo_metrics = (out / "sdpo" / "metrics.json").read_text()
    assert main([*args, "--resume"]) == 0
    shown = capsys.readouterr().out
    assert "stage sft: finished earlier" in shown and "stage sdpo: finished earlier" in shown
    assert {s: (out / "stages" / f"{s}.json").read_text() for s in ("sft", "sdpo")} == before
    assert (out / "sdpo" / "metrics.json").read_text() == sdpo_metrics  # not recomputed

    # an alignment interrupted after its last checkpoint: --resume continues from that checkpoint
    # (no new step) and gives the same records as the uninterrupted run
    (out / "stages" / "sdpo.json").unlink()
    (out / "sdpo" / "metrics.json").unlink()
    assert main([*args, "--resume"]) == 0
    meta = json.loads((out / "sdpo" / "metrics.json").read_text())["run"]
    assert meta["resumed_from"] and Path(meta["resumed_from"]).name == "checkpoint-1"
    assert meta["train_steps"] == 1
    again = [r for r in read_records(results) if r.method == "sdpo"]
    first = [r for r in records if r.method == "sdpo"]
    assert [r.protocol for r in again] == [r.protocol for r in first]
    for a, b in zip(again, first):
        assert a.metrics == pytest.approx(b.metrics, nan_ok=True)


def test_quickstart_sequence_format_trains_sequence_sft_and_skips_generation_for_it(run, tmp_path):
    """The default quickstart recipe (format=sequence) on the tiny model: sequence SFT, S-DPO on its
    history-only prompt; zero-shot keeps both protocols, the trained stages report candidates only."""
    _, data, model, _, _ = run
    out, results = tmp_path / "qs", tmp_path / "results.json"
    args = [
        "quickstart", "--output", str(out), "--results", str(results), f"model={model}", "dtype=float32",
        f"data.path={data}", "data.candidates=5", "baselines=[pop]", "n_train=8", "max_history=4",
        "window=6", "min_context=2", "training.max_steps=1", "training.batch_size=4", "training.warmup_steps=0",
        "training.progress=false", "sdpo.n_train=8", "sdpo.training.max_steps=1", "sdpo.training.batch_size=4",
        "sdpo.training.warmup_steps=0", "sdpo.training.progress=false",
        "eval.n_test=4", "eval.protocols=[candidates,generation]", "eval.max_new_tokens=4",
    ]  # fmt: skip
    assert main(args) == 0
    records = read_records(results)
    assert [(r.method, r.protocol) for r in records] == [
        ("pop", "candidates"), ("zeroshot", "candidates"), ("zeroshot", "generation"),
        ("sft", "candidates"), ("sdpo", "candidates"),
    ]  # fmt: skip
    assert {r.n_examples for r in records} == {4}
    sft_run = json.loads((out / "sft" / "metrics.json").read_text())["run"]
    assert sft_run["format"] == "sequence" and sft_run["train_counts"]["window"] == 6
    assert json.loads((out / "sdpo" / "metrics.json").read_text())["run"]["prompt_format"] == "sequence"
