"""Model arguments that cannot load give one line naming the file, before transformers is asked.

Why: transformers answers a missing directory with a message about hub repo ids, a truncated
safetensors file with a Rust deserialiser error, and wrong-shaped weights with a table printed to
the log before raising. recalign checks the directory first (reading safetensors headers only, and
building the model on the meta device to learn the expected shapes) and says which file is wrong.
The malformed-input catalogue (tests/data/malformed/) runs the same refusals through the CLI on
small committed files; these tests cut and mutate a real saved model, at several points.
"""

from __future__ import annotations

import json
import shutil

import pytest

from recalign.errors import RecalignInputError
from recalign.lm.loading import (
    EMBEDDED_ALIASES,
    build_tiny_llama,
    check_model_source,
    load_model,
    unknown_model_problem,
)
from recalign.lm.lora import LoRAConfig, attach_lora, load_lm, resolve_model, save_adapter


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("paths") / "model"
    build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1).save_pretrained(
        d, safe_serialization=True
    )
    tiny_tokenizer.save_pretrained(d)
    return d


def _copy(saved, tmp_path, name="m"):
    return shutil.copytree(saved, tmp_path / name)


def _refused(path, capfd) -> str:
    capfd.readouterr()
    with pytest.raises(RecalignInputError) as e:
        load_model(path)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # nothing printed: no load report, no progress bar
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_valid_directory_passes_the_checks_and_loads(saved):
    check_model_source(str(saved))
    model, tok = load_model(saved)
    assert model.config.hidden_size == 32 and tok.pad_token_id is not None


def test_missing_directory_and_unknown_name_list_the_embedded_names(tmp_path, capfd):
    for name in (str(tmp_path / "does" / "not" / "exist"), "smolm2", "./runs/typo"):
        msg = _refused(name, capfd)
        assert msg.startswith(f"{name}: no such model directory")
        assert all(a in msg for a in EMBEDDED_ALIASES) and "Repo id" not in msg
    assert unknown_model_problem("smollm2") is None and unknown_model_problem(str(tmp_path)) is None


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_a_truncated_safetensors_file_is_named(saved, tmp_path, capfd, keep):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])
    msg = _refused(d, capfd)
    assert msg.startswith(f"{f}: cannot load model: truncated"), msg


def test_weights_of_the_wrong_shape_are_named(saved, tmp_path, capfd):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 64, 128  # a config that does not fit the weights
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _refused(d, capfd)
    assert msg.startswith(f"{d / 'model.safetensors'}: cannot load model: tensor '"), msg
    assert "has shape [" in msg and "but config.json gives [" in msg and "more)" in msg


def test_config_without_weights_pickles_and_no_tokenizer(saved, tmp_path, capfd):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    msg = _refused(d, capfd)
    assert (
        msg
        == f"{d / 'model.safetensors'}: cannot load model: no such file (the directory has config.json but no weights)"
    )
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert "only the pickled pytorch_model.bin" in _refused(d, capfd)

    d2 = _copy(saved, tmp_path, "no-tok")
    for f in d2.glob("tokenizer*"):
        f.unlink()
    assert _refused(d2, capfd).startswith(f"{d2}: cannot load model: no tokenizer")

    d3 = _copy(saved, tmp_path, "bad-config")
    (d3 / "config.json").write_text("{")
    assert _refused(d3, capfd).startswith(f"{d3 / 'config.json'}: cannot load model: not valid JSON")


def test_an_adapter_whose_base_model_is_gone_names_its_record(saved, tmp_path, tiny_tokenizer):
    base = _copy(saved, tmp_path, "base")
    model = attach_lora(load_model(base)[0], LoRAConfig(r=2, alpha=4))
    adapter = save_adapter(model, tmp_path / "run" / "adapter", base_model=str(base))
    assert resolve_model(tmp_path / "run").adapter == adapter
    load_lm(tmp_path / "run")  # loads while the base exists
    shutil.rmtree(base)
    for arg in (tmp_path / "run", adapter):
        with pytest.raises(RecalignInputError) as e:
            resolve_model(arg)
        assert str(e.value).startswith(
            f"{adapter / 'recalign_adapter.json'}: the adapter's base model '{base}' is missing: no such model directory"
        )
