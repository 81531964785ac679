"""``benchmarks/cllm4rec.py``: every ablation with 2 seeds, on the tiny ML-100K files (the same code path
as the ML-100K run that regenerates ``results/cllm4rec_ml100k.json``)."""

import importlib.util
import json
from pathlib import Path

from test_cllm4rec_cli import files  # noqa: F401  (the fixture: tiny ML-100K files + saved backbone)

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "cllm4rec.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("cllm4rec_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_every_ablation_with_two_seeds(files, tmp_path):  # noqa: F811
    bench = _benchmark()
    results = tmp_path / "res.json"
    argv = ["--config", str(files), "--results", str(results), "--runs", str(tmp_path / "runs"),
            "--splits", "holdout", "--seeds", "0,1",
            "--only", "pop,cllm4rec,cllm4rec-no-content,cllm4rec-no-mutual",
            "pretrain.collab_steps=1", "finetune.steps=0", "finetune.epochs=1"]  # fmt: skip
    assert bench.main(argv) == 0
    recs = json.loads(results.read_text())["records"]
    got = sorted((r["method"], r["seed"]) for r in recs)
    assert got == sorted([("pop", 0)] + [(m, s) for m in bench.VARIANTS for s in (0, 1)])
    by = {(r["method"], r["seed"]): r for r in recs}
    assert (
        by[("cllm4rec-no-content", 1)]["extra"]["settings_differing_from_default"]["pretrain.content_ratio"]
        == 0
    )
    assert (
        by[("cllm4rec-no-mutual", 0)]["extra"]["settings_differing_from_default"]["finetune.mutual_lambda"]
        == 0
    )
    assert by[("cllm4rec", 1)]["extra"]["settings_differing_from_default"]["seed"] == 1
    assert by[("cllm4rec", 0)]["n_examples"] == by[("pop", 0)]["n_examples"]  # the same users
    assert all(r["split"] == "holdout" and r["protocol"] == "full" for r in recs)


def _library_warning_shown() -> bool:
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # keeps the active filters
        warnings.warn_explicit("deprecated", FutureWarning, "modeling_utils.py", 1, module="peft.peft_model")
    return bool(caught)


def test_benchmark_is_quiet_unless_verbose(files, tmp_path):  # noqa: F811
    """A benchmark silences library FutureWarnings as the CLI does; ``-v`` shows them again."""
    from recalign.logs import configure

    bench = _benchmark()
    argv = ["--config", str(files), "--results", str(tmp_path / "r.json"), "--runs", str(tmp_path / "runs"),
            "--splits", "holdout", "--only", "pop"]  # fmt: skip
    configure(1)  # the libraries' defaults, whatever an earlier test did
    assert _library_warning_shown()
    assert bench.main(argv) == 0
    assert not _library_warning_shown()
    assert bench.main([*argv, "-v"]) == 0
    assert _library_warning_shown()
    configure(0)


def test_suffix_is_taken_with_or_without_its_dash(monkeypatch):
    """``--suffix p10`` names runs as ``--suffix=-p10`` does (argparse refuses ``--suffix -p10``)."""
    bench = _benchmark()
    seen = []
    monkeypatch.setattr(bench, "_run", lambda *a, **k: seen.append(a[7]) or 0)
    for argv in (["--suffix", "p10"], ["--suffix=-p10"], []):
        assert bench.main(["--only", "cllm4rec", *argv]) == 0
    assert seen == ["-p10", "-p10", ""]


def test_paired_comparison_reproduces_the_records_and_pairs_users(files, tmp_path):  # noqa: F811
    """``benchmarks/cllm4rec_paired.py`` re-ranks finished runs and retrained baselines on the same users:
    its means equal the benchmark's records (the same ranking, recomputed), and each paired difference is
    the difference of the two means."""
    bench = _benchmark()
    spec = importlib.util.spec_from_file_location("cllm4rec_paired", SCRIPT.with_name("cllm4rec_paired.py"))
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    results, runs = tmp_path / "res.json", tmp_path / "runs"
    argv = ["--config", str(files), "--results", str(results), "--runs", str(runs), "--splits", "holdout",
            "--seeds", "0", "--only", "pop,bprmf,cllm4rec,cllm4rec-no-content",
            "pretrain.collab_steps=1", "finetune.steps=0", "finetune.epochs=1"]  # fmt: skip
    assert bench.main(argv) == 0
    out = tmp_path / "paired.json"
    dirs = [runs / "cllm4rec-s0-holdout", runs / "cllm4rec-no-content-s0-holdout"]
    argv = ["--config", str(files), "--results", str(results), "--out", str(out),
            "--runs", ",".join(map(str, dirs)), "--baselines", "pop,bprmf"]  # fmt: skip
    assert paired.main(argv) == 0
    doc = json.loads(out.read_text())
    recs = {r["method"]: r for r in json.loads(results.read_text())["records"]}
    assert doc["users"] == recs["pop"]["n_examples"]
    for label, entry in doc["methods"].items():
        method = label.removesuffix(" s0")
        assert entry["matches_record"], label
        for m, v in entry["metrics"].items():
            assert abs(v - recs[method]["metrics"][m]) < 1e-9
    a, b = doc["methods"]["cllm4rec s0"]["metrics"], doc["methods"]["bprmf s0"]["metrics"]
    d = doc["paired"]["bprmf s0 - cllm4rec s0"]["Recall@20"]
    assert abs(d["diff"] - (b["Recall@20"] - a["Recall@20"])) < 1e-12 and d["n"] == doc["users"]
    assert len(doc["paired"]) == 6  # every pair of the four methods


def test_pretrain_from_reuses_a_finished_pretraining(files, tmp_path):  # noqa: F811
    """``--pretrain-from`` starts a fine-tuning ablation from another run's pretrained tables: pretraining
    does not run again, the tables are byte-equal, and the records say where they came from."""
    import pytest

    from recalign.errors import RecalignInputError

    bench = _benchmark()
    runs, results = tmp_path / "runs", tmp_path / "res.json"
    base = ["--config", str(files), "--results", str(results), "--runs", str(runs), "--splits", "holdout",
            "--seeds", "0", "--only", "cllm4rec"]  # fmt: skip
    over = ["pretrain.collab_steps=2", "finetune.epochs=1"]
    assert bench.main([*base, "--suffix", "a", *over]) == 0
    source = runs / "cllm4rec-a-s0-holdout"
    argv = [*base, "--suffix", "b", "--pretrain-from", str(runs / "{name}-a-s{seed}-{split}"),
            *over, "finetune.patience=5"]  # fmt: skip
    assert bench.main(argv) == 0
    out = runs / "cllm4rec-b-s0-holdout"
    assert (out / "pretrain.safetensors").read_bytes() == (source / "pretrain.safetensors").read_bytes()
    assert (source / "checkpoints" / "pretrain").is_dir()
    assert not (out / "checkpoints" / "pretrain").exists()  # only fine-tuning trained in the new directory
    assert (out / "checkpoints" / "finetune").is_dir()
    by = {r["method"]: r for r in json.loads(results.read_text())["records"]}
    assert by["cllm4rec-b"]["extra"]["pretrain_from"] == str(source)
    assert "pretrain_from" not in by["cllm4rec-a"]["extra"]
    assert (
        by["cllm4rec-b"]["extra"]["training"]["pretrain"] == by["cllm4rec-a"]["extra"]["training"]["pretrain"]
    )
    # a different pretraining setting cannot borrow those tables
    with pytest.raises(RecalignInputError, match="'pretrain' differs"):
        bench.main([*base, "--suffix", "c", "--pretrain-from", str(source), *over, "pretrain.lr=0.001"])
    assert not (runs / "cllm4rec-c-s0-holdout" / "pretrain.safetensors").exists()
    # the same directory with another fine-tuning setting is refused too (the check reuse shares)
    with pytest.raises(RecalignInputError, match="'finetune' differs from the run already in this directory"):
        bench.main([*base, "--suffix", "a", *over, "finetune.lr=0.001"])
    # nor tables pretrained in another compute dtype (``model.dtype: auto`` resolves per machine)
    info = json.loads((source / "backbone.json").read_text())
    assert info["dtype"] in ("float32", "bfloat16")
    assert by["cllm4rec-b"]["extra"]["pretrain_dtype"] == info["dtype"] == by["cllm4rec-b"]["extra"]["dtype"]
    other = "float32" if info["dtype"] == "bfloat16" else "bfloat16"
    (source / "backbone.json").write_text(json.dumps({**info, "dtype": other}))
    with pytest.raises(RecalignInputError, match=f"pretrained in {other}, but this run computes in"):
        bench.main([*base, "--suffix", "e", "--pretrain-from", str(source), *over])
    assert not (runs / "cllm4rec-e-s0-holdout" / "pretrain.safetensors").exists()
    # nor can a directory whose pretraining has not finished
    (runs / "unfinished").mkdir()
    with pytest.raises(RecalignInputError, match="no finished pretraining"):
        bench.main([*base, "--suffix", "d", "--pretrain-from", str(runs / "unfinished"), *over])


def _paired_script():
    spec = importlib.util.spec_from_file_location("cllm4rec_paired", SCRIPT.with_name("cllm4rec_paired.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_arms_average_the_seeds_of_a_setting(files, tmp_path):  # noqa: F811
    """``--arm NAME=...`` averages a setting's seeds per user: an arm's means are the mean of its members'
    means (the same users), and each arm pair's difference is the difference of the arm means."""
    import pytest

    bench, paired = _benchmark(), _paired_script()
    results, runs = tmp_path / "res.json", tmp_path / "runs"
    argv = ["--config", str(files), "--results", str(results), "--runs", str(runs), "--splits", "holdout",
            "--seeds", "0,1", "--only", "cllm4rec", "pretrain.collab_steps=1", "finetune.steps=0",
            "finetune.epochs=1"]  # fmt: skip
    assert bench.main(argv) == 0
    s0, s1 = runs / "cllm4rec-s0-holdout", runs / "cllm4rec-s1-holdout"
    out = tmp_path / "paired.json"
    base = ["--config", str(files), "--results", str(results), "--out", str(out), "--baselines", "pop"]
    assert paired.main([*base, "--arm", f"full={s0},{s1}", "--arm", "popularity=pop"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["methods"]) == {"pop s0", "cllm4rec s0", "cllm4rec s1"}  # arm members are scored too
    arm = doc["arms"]["full"]
    assert arm["members"] == ["cllm4rec s0", "cllm4rec s1"]
    m0, m1 = doc["methods"]["cllm4rec s0"]["metrics"], doc["methods"]["cllm4rec s1"]["metrics"]
    assert m0 != m1  # the seeds differ, so the mean is a real average
    for m, v in arm["metrics"].items():
        assert abs(v - (m0[m] + m1[m]) / 2) < 1e-9
    d = doc["paired_arms"]["full - popularity"]["Recall@20"]
    pop = doc["methods"]["pop s0"]["metrics"]["Recall@20"]
    assert abs(d["diff"] - (arm["metrics"]["Recall@20"] - pop)) < 1e-12 and d["n"] == doc["users"]
    # malformed arms are refused before anything is scored
    with pytest.raises(SystemExit, match="expected NAME=MEMBER"):
        paired.main([*base, "--arm", "full"])
    with pytest.raises(SystemExit, match="baseline bprmf is not in --baselines"):
        paired.main([*base, "--arm", "b=bprmf"])
    with pytest.raises(SystemExit, match="not a finished CLLM4Rec run"):
        paired.main([*base, "--arm", f"x={tmp_path / 'nowhere'}"])
