"""Model loading: tiny test models, safetensors-only local loading, the embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from recalign.errors import RecalignInputError
from recalign.lm.loading import build_tiny_llama, load_model, load_tokenizer, train_bpe_tokenizer


def test_bpe_tokenizer_specials_and_roundtrip(tiny_tokenizer):
    tok = tiny_tokenizer
    for special in ("<pad>", "<s>", "</s>", "<unk>"):
        assert tok.convert_tokens_to_ids(special) is not None
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    ids = tok("Star Wars (1977)").input_ids
    assert ids[0] == tok.bos_token_id  # the post-processor prepends BOS
    assert tok.decode(ids, skip_special_tokens=True) == "Star Wars (1977)"
    # byte-level: unseen characters still encode and decode
    assert tok.decode(tok.encode("Mépris ☃", add_special_tokens=False)) == "Mépris ☃"
    assert len(tok) <= 400


def test_tiny_llama_is_seeded_and_sized(tiny_tokenizer):
    a = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    b = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    c = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=6)
    assert a.config.vocab_size == len(tiny_tokenizer)
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight  # tied
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
        assert not torch.equal(a(input_ids=x).logits, c(input_ids=x).logits)


def test_local_model_roundtrip_is_safetensors_only(tmp_path, tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, tok = load_model(tmp_path / "m")
    x = torch.tensor([[1, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert tok.pad_token_id is not None and tok("Heat").input_ids == tiny_tokenizer("Heat").input_ids

    # a pickle checkpoint is refused (no safetensors file) with a one-line input error
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    tiny_tokenizer.save_pretrained(pickled)
    if (pickled / "model.safetensors").exists():  # pragma: no cover - transformers may ignore the flag
        (pickled / "model.safetensors").unlink()
    with pytest.raises(RecalignInputError) as err:
        load_model(pickled)
    assert "\n" not in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecalignInputError, match="config.json"):
        load_model(empty)


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    tok = train_bpe_tokenizer(["a b c d e f"] * 4, vocab_size=300)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_cache_with_gguf_record_is_incomplete_and_record_is_stripped(tmp_path):
    from recalign.lm.loading import _complete, _strip_quantization_record

    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "tokenizer.json").write_text("{}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    assert not _complete(tmp_path)  # an old cache is converted again
    _strip_quantization_record(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}
    assert _complete(tmp_path)


@pytest.mark.slow
def test_embedded_smollm2():
    from recalign.lm.loading import smollm2_cache_dir

    model, tok = load_model("smollm2")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (smollm2_cache_dir() / "model.safetensors").is_file()
    # plain float weights: the cached config carries no GGUF quantisation record
    assert "quantization_config" not in json.loads((smollm2_cache_dir() / "config.json").read_text())
    # the dequantised weights make a sensible LM: natural text is far more likely than uniform
    # (ln 49152 = 10.8 nats/token) and than the same tokens shuffled
    ids = tok("The capital of France is Paris. It is a large city with many museums.").input_ids
    shuffled = [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]

    def nll(seq):
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq]), labels=torch.tensor([seq])).loss.item()

    assert nll(ids) < 5.0
    assert nll(ids) + 2.0 < nll(shuffled)
