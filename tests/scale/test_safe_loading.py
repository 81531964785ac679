"""Safe loading at run time, complementing the source scan in tests/test_safety.py.

Why both: the source scan proves no call site *asks* for pickle or remote code; these tests prove
what actually happens when a user hands recalign a hostile or legacy directory, and that what recalign
itself writes can be read back without unpickling:

- a model directory holding only ``pytorch_model.bin`` (a pickle) is refused, not loaded;
- a model directory whose ``config.json`` maps to custom code never runs that code;
- an adapter holding only ``adapter_model.bin`` is refused;
- every weight file of an SFT run directory is safetensors; the only ``.pt``/``.pth`` files are
  Trainer's optimizer/scheduler/RNG states, and they load with ``torch.load(weights_only=True)``
  with nothing but numpy arrays allow-listed, as Trainer reads them on resume (so resuming never
  needs a full unpickler); no ``training_args.bin`` pickle is kept;
- configs that point at missing files are a one-line error with exit code 2;
- a few more unsafe deserialisers (yaml.load, pandas pickles, torch.save, TorchScript) never
  appear in the source.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _procs import TINY

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.lm.loading import build_tiny_llama, load_model  # noqa: E402
from recalign.lm.lora import LoRAConfig, attach_lora, load_lm  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src" / "recalign"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    return {
        "root": root,
        "model": _lm_tiny.write_tiny_model(root / "model"),
        "data": _lm_tiny.write_ml100k_dir(root / "ml"),
    }


def _copy_model(base, name: str) -> Path:
    import shutil

    d = base["root"] / name
    shutil.copytree(base["model"], d)
    return d


def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def test_pickle_only_model_directory_is_refused(base, capsys):
    d = _copy_model(base, "pickled")
    state = load_model(d)[0].state_dict()
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")  # what an old or hostile checkpoint looks like
    with pytest.raises(RecalignInputError, match="model.safetensors"):
        load_model(d)
    line = one_error_line(
        capsys,
        ["evaluate", "--model", str(d), "--dataset", "ml-100k", "--path", str(base["data"]), "--output",
         str(base["root"] / "ev")],
    )  # fmt: skip
    assert "pickled" in line and "cannot load model" in line


def test_remote_code_in_a_model_directory_is_never_run(base, tmp_path):
    d = _copy_model(base, "remote")
    sentinel = tmp_path / "code-was-run"
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.Cfg", "AutoModelForCausalLM": "custom.Model"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class Cfg(LlamaConfig):\n    pass\nclass Model(LlamaForCausalLM):\n    pass\n"
    )
    try:
        model, _ = load_model(d)
        assert type(model).__name__ == "LlamaForCausalLM"  # the built-in class, not custom.Model
    except RecalignInputError:
        pass  # refusing is fine too; running the code is not
    assert not sentinel.exists()


def test_pickle_only_adapter_is_refused(base, capsys):
    model = build_tiny_llama(_lm_tiny.tiny_tokenizer(), hidden_size=32, num_layers=1, num_heads=2)
    peft_model = attach_lora(model, LoRAConfig(r=2, alpha=4))
    d = base["root"] / "adapter-bin"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({**peft_model.peft_config["default"].to_dict(), "base_model_name_or_path": str(base["model"])},
                   default=list)
    )  # fmt: skip
    torch.save({k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, d / "adapter_model.bin")
    with pytest.raises(RecalignInputError, match="adapter_model.safetensors"):
        load_lm(d)
    line = one_error_line(capsys, ["recommend", "--model", str(d), "--history", "Heat (1995)"])
    assert "adapter_model.safetensors" in line


def test_sft_run_directory_holds_no_pickles(base, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(base["model"]),
                "data": {"dataset": "ml-100k", "path": str(base["data"]), "split": "llara", "candidates": 5},
                "n_train": 8,
                "max_history": 4,
                "training": {"max_steps": 2, "batch_size": 4, "save_steps": 1, "progress": False},
                "eval": {"n_test": 2, "protocols": ["candidates"]},
            }
        )
    )
    assert main(["sft", "--config", str(cfg), "--output", str(out)]) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".md", ".pt", ".pth"}, suffixes
    assert not any(p.name == "training_args.bin" for p in files)
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"adapter", "checkpoint-2"}
    trainer_states = [p for p in files if p.suffix in (".pt", ".pth")]
    assert {p.name for p in trainer_states} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    from transformers.trainer_pt_utils import safe_globals

    for p in trainer_states:
        # how Trainer reads them on resume: the restricted unpickler, with only numpy arrays/dtypes
        # (the RNG state) allow-listed; anything else in the file would raise here
        with safe_globals():
            torch.load(p, weights_only=True)


def test_configs_pointing_to_missing_files_exit_2(base, tmp_path, capsys):
    missing = tmp_path / "missing"
    data = {"dataset": "ml-100k", "path": str(base["data"]), "split": "llara", "candidates": 5}
    cases = [
        ("sft", {"model": str(missing / "model"), "data": data}, "missing/model"),
        ("sft", {"model": str(base["model"]), "data": {**data, "path": str(missing / "ml")}}, "missing/ml"),
        (
            "knowledge",
            {"model": str(base["model"]), "data": {**data, "path": str(missing / "ml")}},
            "missing/ml",
        ),
    ]
    for i, (command, cfg, where) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        line = one_error_line(capsys, [command, "--config", str(path), "--output", str(tmp_path / f"o{i}")])
        assert where in line, line
    line = one_error_line(capsys, ["sft", "--config", str(missing / "sft.yaml"), "--output", str(tmp_path)])
    assert "sft.yaml: config file not found" in line


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"\byaml\.(unsafe_|full_)?load\(", "yaml.load builds arbitrary objects; use yaml.safe_load"),
        (r"\bread_pickle\(|\.to_pickle\(", "pandas pickles"),
        (r"\btorch\.save\(", "our own weights and states are safetensors/JSON"),
        (r"\bpickle\.dumps?\(", "pickle files"),
        (r"\btorch\.jit\.load\(", "TorchScript archives run code"),
        (r"\bmarshal\.loads?\(|\bshelve\.open\(", "marshal/shelve"),
        (r"(?<![\w.])exec\(", "exec of text"),
    ],
)
def test_source_has_no_other_unsafe_deserialisers(pattern, why):
    hits = []
    for p in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                hits.append(f"{p.relative_to(SRC)}:{n}")
    assert not hits, f"{why}: {hits}"
