"""Hybrid item tokens (LLaRA): a recommender's item embedding as one soft token after each item's title.

LLaRA (Liao et al. 2024) shows a sequential recommender's knowledge to the LM by writing every item of a
prompt as ``Title [emb]``: its title, then one *soft* token whose input embedding is the item's embedding
from a trained, frozen sequential recommender (SASRec), mapped into the LM's input-embedding space by a
small trainable MLP. This module holds the LM-side machinery:

- **Representation.** Prompt token-id lists stay lists of ints; the soft token of item ``i`` is the id
  ``-(i + 1)`` (:func:`recalign.lm.prompts.soft_token_id`). Prompt texts carry it as a mark
  (:func:`recalign.lm.prompts.item_slot`, written by the prompt builders with ``item_tokens=True``) that
  :func:`recalign.lm.prompts.encode_prompt` turns into that id, so everything that stores, caches or
  batches prompt ids (preference data, the reference cache key, the collator) handles hybrid prompts
  unchanged. Answers stay plain token ids.
- **The module.** :class:`ItemTokens` owns the frozen ``[n_items, d_rec]`` item table (a buffer) and the
  projector ``d_rec -> hidden -> d_lm`` (GELU MLP, float32 like LoRA weights). It is attached to the
  causal LM itself (:func:`attach_item_tokens`, attribute :data:`ATTR` of the ``*ForCausalLM`` under any
  peft wrapper), which is what makes it part of "the model" everywhere without new arguments: the
  Trainer's optimiser sees its parameters, DDP synchronises their gradients, ``merge_and_unload`` keeps
  it, ``.to(device)`` moves it and :func:`recalign.lm.reference.model_fingerprint` (the reference cache
  key) hashes its weights.
- **Embedding a prompt.** :func:`decoder_inputs` is what every shared-prefix path (packed, kv, naive,
  joint scoring + generation, generation) feeds the decoder: ``{"input_ids": ids}`` when no id is
  negative -- exactly the text-only path, no copy, no extra work -- else ``{"inputs_embeds": ...}``
  with the LM's own input embeddings for ids ``>= 0`` and ``projector(item_table[i])`` at soft tokens.
- **Saving.** :func:`save_item_tokens` writes ``hybrid_projector.safetensors`` (projector weights *and*
  the frozen item table, so a saved model needs no recommender to load) plus ``hybrid_projector.json``
  (shapes, item count, a fingerprint of the catalogue's item ids, where the table came from) beside the
  adapter; :func:`recalign.lm.lora.load_lm` attaches it automatically when present. A corrupted,
  truncated or mismatched file is a one-line :class:`~recalign.errors.RecalignInputError` naming it.
- **The item head** (optional, :meth:`ItemTokens.add_item_head`; ``hybrid.item_head`` of sequence SFT):
  soft tokens only *feed* SASRec's space to the LM, which must then learn to decode it into title
  tokens -- on a CPU budget it did not (the hybrid sequence run's title NLL was that of the text-only
  run). E4SRec and CLLM4Rec instead read items *out* of the LM's final hidden state against item
  vectors: here ``logits[j] = h . Q(E_j) + b_j`` over the whole catalogue, with ``E`` the same frozen
  table (scaled to unit mean row norm), ``Q`` a trainable linear map ``d_rec -> d_lm`` (its own, not the
  input projector) and ``b`` a per-item bias (zeros at first; it can learn popularity). So an item is
  one softmax over the catalogue instead of a dozen title tokens, and the collaborative geometry of
  ``E`` is used as is. The
  head lives in the same module, so it trains, moves, merges, hashes and saves exactly like the
  projector (extra tensors ``item_head.weight`` / ``item_bias`` in the same file, ``item_head: true``
  in the JSON); a file without them is a model without a head.

Decoder-only models only (the soft token enters through ``inputs_embeds``, which every HF causal LM
accepts); encoder-decoders are refused when attaching.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from recalign.errors import RecalignInputError
from recalign.io import atomic_write_bytes, atomic_write_json
from recalign.lm.modules import unwrap_peft

#: attribute of the ``*ForCausalLM`` holding its :class:`ItemTokens`
ATTR = "recalign_item_tokens"
PROJECTOR_FILE = "hybrid_projector.safetensors"
PROJECTOR_META = "hybrid_projector.json"
FORMAT = "recalign-hybrid-v1"

__all__ = [
    "ATTR",
    "PROJECTOR_FILE",
    "PROJECTOR_META",
    "ItemTokens",
    "attach_item_tokens",
    "catalogue_fingerprint",
    "check_dataset",
    "decoder_inputs",
    "has_item_tokens",
    "item_head_of",
    "item_tokens_of",
    "load_item_tokens",
    "load_item_tokens_state",
    "new_item_tokens",
    "prompt_embeddings",
    "save_item_tokens",
    "uses_item_tokens",
]


class ItemTokens(nn.Module):
    """A frozen item table and the trainable projector that maps its rows into the LM's embedding space.

    Args:
        item_table: ``[n_items, d_rec]``, row ``i`` = dataset item ``i`` (e.g.
            :meth:`recalign.baselines.SequentialRecommender.item_embeddings`); stored as a float32 buffer.
        d_lm: the LM's input-embedding width.
        hidden: the projector's hidden width.
        info: JSON-able provenance (recommender, catalogue fingerprint), saved with the weights.

    Optionally also an item output head over the same table (:meth:`add_item_head`, :meth:`item_logits`).
    """

    def __init__(self, item_table: torch.Tensor, d_lm: int, hidden: int, info: dict | None = None) -> None:
        super().__init__()
        if item_table.ndim != 2 or item_table.shape[0] < 1:
            raise ValueError(f"item table must be [n_items, d_rec], got {tuple(item_table.shape)}")
        self.register_buffer("item_table", item_table.detach().float().contiguous().clone())
        d_rec = int(item_table.shape[1])
        # Distinctive layer names: LoRA's target-module suffix match must never pick them up.
        self.projector = nn.Sequential(
            OrderedDict(
                item_in=nn.Linear(d_rec, int(hidden)),
                item_act=nn.GELU(),
                item_out=nn.Linear(int(hidden), int(d_lm)),
            )
        )
        self.info = dict(info or {})
        self.source: str | None = None  # the file it was loaded from, for error messages
        self.item_head: nn.Linear | None = None
        self.item_bias: nn.Parameter | None = None

    def add_item_head(self) -> ItemTokens:
        """Give the module its output head (see the module docstring); seed torch first. Returns self.

        ``Q`` has no bias: ``h . c`` would add the same number to every item's logit, which the softmax
        ignores (its gradient is zero). ``Q`` reads the table scaled to unit mean row norm
        (:meth:`head_keys`) and starts at ``N(0, (0.1 / sqrt(d_lm))^2)``: a key then has norm ~0.1, so
        the first logits are ~0.1 x RMS(h) -- an almost uniform distribution -- while the gradient
        already reaches the LM through ``h``.
        """
        p = self.projector.item_in.weight
        self.item_head = nn.Linear(self.d_rec, self.d_lm, bias=False).to(p.device)
        with torch.no_grad():
            self.item_head.weight.normal_(0.0, 0.1 / self.d_lm**0.5)
        self.item_bias = nn.Parameter(torch.zeros(self.n_items, device=p.device))
        self.item_head.weight.requires_grad_(p.requires_grad)
        self.item_bias.requires_grad_(p.requires_grad)
        return self

    @property
    def has_item_head(self) -> bool:
        return self.item_head is not None

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, d_lm]`` final hidden states -> ``[N, n_items]`` float32 item logits ``h . Q(E) + b``."""
        if self.item_head is None or self.item_bias is None:
            raise RecalignInputError("the hybrid projector has no item head")
        return hidden.float() @ self.head_keys().t() + self.item_bias

    def head_keys(self) -> torch.Tensor:
        """``[n_items, d_lm]`` item vectors ``Q(E / mean_j |E_j|)`` (tiny next to one LM forward).

        Why the fixed rescaling: a recommender's embeddings can have any scale (a briefly trained
        SASRec's are far smaller than a converged one's), and Adam moves every entry of ``Q`` by about
        the learning rate per step whatever that scale is; on the raw table the logits would move at a
        speed set by the recommender. With unit-length rows on average, ``Q`` sees inputs like any
        linear layer's and a step moves a logit about as much as a step of an LM head does. It is a
        function of the frozen table, so nothing extra is saved."""
        table = self.item_table
        return self.item_head(table / table.norm(dim=1).mean().clamp(min=1e-12))

    @property
    def n_items(self) -> int:
        return int(self.item_table.shape[0])

    @property
    def d_rec(self) -> int:
        return int(self.item_table.shape[1])

    @property
    def hidden(self) -> int:
        return int(self.projector.item_in.out_features)

    @property
    def d_lm(self) -> int:
        return int(self.projector.item_out.out_features)

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        """``[...]`` item indices -> ``[..., d_lm]`` soft-token embeddings (float32)."""
        if item_idx.numel() and (int(item_idx.min()) < 0 or int(item_idx.max()) >= self.n_items):
            where = f" ({self.source})" if self.source else ""
            raise RecalignInputError(
                f"soft item token for item {int(item_idx.max())} but the hybrid projector{where} "
                f"knows {self.n_items} items"
            )
        return self.projector(self.item_table[item_idx])

    def shapes(self) -> dict:
        return {"n_items": self.n_items, "d_rec": self.d_rec, "hidden": self.hidden, "d_lm": self.d_lm}


# ---------------------------------------------------------------------- the module on a model
def _causal_lm(model) -> nn.Module:
    """The ``*ForCausalLM`` under DDP and peft wrappers (where :data:`ATTR` lives)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return unwrap_peft(model)


def item_tokens_of(model) -> ItemTokens | None:
    """The model's :class:`ItemTokens`, or None for a text-only model."""
    module = getattr(_causal_lm(model), ATTR, None)
    return module if isinstance(module, ItemTokens) else None


def has_item_tokens(model) -> bool:
    return item_tokens_of(model) is not None


def item_head_of(model) -> ItemTokens | None:
    """The model's :class:`ItemTokens` when it has an item head (:meth:`ItemTokens.add_item_head`)."""
    module = item_tokens_of(model)
    return module if module is not None and module.has_item_head else None


def attach_item_tokens(model, module: ItemTokens, *, trainable: bool = False):
    """Attach ``module`` to ``model`` (replacing any attached one), on the model's device; returns model.

    ``trainable`` sets the projector's ``requires_grad`` (the item table is a buffer, always frozen).
    Attach *after* :func:`recalign.lm.lora.attach_lora` or wrap adapter creation in
    :func:`item_tokens_detached`: peft freezes every parameter it finds on the base model.
    """
    base = _causal_lm(model)
    if getattr(base.config, "is_encoder_decoder", False):
        raise RecalignInputError("hybrid item tokens need a decoder-only LM (got an encoder-decoder)")
    emb = base.get_input_embeddings()
    d_lm = int(emb.weight.shape[1])
    if module.d_lm != d_lm:
        where = module.source or "hybrid projector"
        raise RecalignInputError(
            f"projector maps into {module.d_lm} dimensions but the model's embeddings have {d_lm}",
            source=where,
        )
    module.to(emb.weight.device)
    for p in module.parameters():
        p.requires_grad_(trainable)
    setattr(base, ATTR, module)
    return model


@contextmanager
def item_tokens_detached(model) -> Iterator[None]:
    """Take the item-token module off ``model`` inside the block (e.g. while peft injects an adapter, so
    that ``target_modules="all-linear"`` does not put LoRA layers into the projector), then put it back
    with its parameters' ``requires_grad`` as they were."""
    base = _causal_lm(model)
    module = item_tokens_of(base)
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    delattr(base, ATTR)
    try:
        yield
    finally:
        setattr(_causal_lm(model), ATTR, module)
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def prompt_embeddings(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Input embeddings of a ``[B, T]`` id tensor holding soft tokens (negative ids), or None if none does.

    Ids ``>= 0`` get the LM's own input embeddings (exactly what ``input_ids`` would give), soft tokens
    ``-(i + 1)`` get ``projector(item_table[i])`` cast to the embedding dtype; differentiable in the
    projector (and in the embeddings, if they train).
    """
    soft = ids < 0
    if not bool(soft.any()):
        return None
    module = item_tokens_of(model)
    if module is None:
        raise RecalignInputError(
            "prompt holds soft item tokens but the model has no hybrid projector "
            "(load a hybrid run, or build prompts without item tokens)"
        )
    emb = _causal_lm(model).get_input_embeddings()
    tok = emb(ids.clamp(min=0))
    vecs = module(-ids[soft] - 1).to(tok.dtype)
    placed = torch.zeros_like(tok).index_put((soft.nonzero(as_tuple=True)), vecs)
    return torch.where(soft[..., None], placed, tok)


def decoder_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"input_ids": ids}`` for text-only ids (the unchanged path), else ``{"inputs_embeds": ...}``."""
    embeds = prompt_embeddings(model, ids)
    return {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}


def uses_item_tokens(model, dataset=None) -> bool:
    """Whether prompts for ``model`` should carry soft item tokens; with ``dataset``, also checks that the
    projector was built for that catalogue (:func:`check_dataset`)."""
    module = item_tokens_of(model)
    if module is None:
        return False
    if dataset is not None:
        check_dataset(module, dataset)
    return True


# ---------------------------------------------------------------------- catalogue identity
def catalogue_fingerprint(dataset) -> str:
    """sha256 of the catalogue's item ids in index order: row ``i`` of an item table means item ``i``."""
    ids = dataset.items["item_id"].astype(str).tolist() if "item_id" in dataset.items else []
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def check_dataset(module: ItemTokens, dataset) -> None:
    """One-line error when ``module``'s item table was not built for ``dataset``'s catalogue."""
    where = module.source or "hybrid projector"
    if module.n_items != dataset.n_items:
        raise RecalignInputError(
            f"projector has {module.n_items} items but dataset '{dataset.name}' has {dataset.n_items}",
            source=where,
        )
    expected = module.info.get("catalogue_sha256")
    if expected and expected != catalogue_fingerprint(dataset):
        raise RecalignInputError(
            f"projector was built for another catalogue than dataset '{dataset.name}' (item ids differ)",
            source=where,
        )


# ---------------------------------------------------------------------- building
def new_item_tokens(
    model, item_table: torch.Tensor, *, hidden: int = 0, info: dict | None = None
) -> ItemTokens:
    """A fresh projector for ``model`` over ``item_table`` (seed torch first for reproducibility).

    ``hidden`` 0 uses the LM's embedding width (LLaRA's choice). The output layer is then rescaled so
    that the projected table's RMS equals that of the LM's input embeddings: a soft token starts at the
    scale of a word embedding instead of (for SASRec's ~0.1-norm rows) almost zero, or swamping the
    prompt with a far larger vector.
    """
    emb = _causal_lm(model).get_input_embeddings().weight
    d_lm = int(emb.shape[1])
    module = ItemTokens(item_table, d_lm, hidden or d_lm, info)
    with torch.no_grad():
        out = module.projector(module.item_table)
        scale = emb.detach().float().pow(2).mean().sqrt() / out.pow(2).mean().sqrt().clamp(min=1e-12)
        module.projector.item_out.weight.mul_(scale)
        module.projector.item_out.bias.mul_(scale)
    return module


# ---------------------------------------------------------------------- saving and loading
def save_item_tokens(model_or_module, directory: str | Path) -> Path | None:
    """Write ``hybrid_projector.safetensors`` + ``.json`` into ``directory`` (atomically); None if the
    model has no item tokens."""
    from safetensors.torch import save

    module = model_or_module if isinstance(model_or_module, ItemTokens) else item_tokens_of(model_or_module)
    if module is None:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"format": FORMAT, **{k: str(v) for k, v in module.shapes().items()}}
    if module.has_item_head:
        meta["item_head"] = "true"
    atomic_write_bytes(directory / PROJECTOR_FILE, save(tensors, metadata=meta))
    table_sha = hashlib.sha256(tensors["item_table"].numpy().tobytes()).hexdigest()
    atomic_write_json(
        directory / PROJECTOR_META,
        {"format": FORMAT, **module.shapes(), "item_head": module.has_item_head, "item_table_sha256": table_sha,
         **module.info},
    )  # fmt: skip
    return directory / PROJECTOR_FILE


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as e:  # SafetensorError, OSError, ...: a damaged file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecalignInputError(f"cannot read hybrid projector ({first})", source=path) from None
    return tensors, meta


def load_item_tokens(path: str | Path) -> ItemTokens:
    """The :class:`ItemTokens` saved in ``path`` (a directory holding :data:`PROJECTOR_FILE`, or the file).

    Every inconsistency (unreadable or truncated file, missing tensors, shapes that disagree with each
    other or with the JSON record) is a one-line :class:`RecalignInputError` naming the file.
    """
    path = Path(path)
    file = path / PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise RecalignInputError("hybrid projector file missing", source=file)
    tensors, meta = _read(file)
    if meta.get("format") != FORMAT:
        raise RecalignInputError(
            f"not a recalign hybrid projector (format {meta.get('format')!r})", source=file
        )
    need = ("item_table", "projector.item_in.weight", "projector.item_in.bias", "projector.item_out.weight",
            "projector.item_out.bias")  # fmt: skip
    missing = [k for k in need if k not in tensors]
    if missing:
        raise RecalignInputError(f"hybrid projector lacks tensor '{missing[0]}'", source=file)
    table, w_in, b_in = (
        tensors["item_table"],
        tensors["projector.item_in.weight"],
        tensors["projector.item_in.bias"],
    )
    w_out, b_out = tensors["projector.item_out.weight"], tensors["projector.item_out.bias"]
    ok = (
        table.ndim == 2
        and w_in.ndim == 2
        and w_out.ndim == 2
        and w_in.shape[1] == table.shape[1]
        and b_in.shape == (w_in.shape[0],)
        and w_out.shape[1] == w_in.shape[0]
        and b_out.shape == (w_out.shape[0],)
    )
    if not ok:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
        raise RecalignInputError(f"hybrid projector tensors have inconsistent shapes ({shapes})", source=file)
    info: dict = {}
    meta_file = file.parent / PROJECTOR_META
    if meta_file.is_file():
        try:
            info = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RecalignInputError(
                f"unreadable JSON ({str(e).splitlines()[0]})", source=meta_file
            ) from None
        if not isinstance(info, dict):
            raise RecalignInputError("expected a JSON object", source=meta_file)
        actual = {
            "n_items": table.shape[0],
            "d_rec": table.shape[1],
            "hidden": w_in.shape[0],
            "d_lm": w_out.shape[0],
        }
        for key, value in actual.items():
            if key in info and info[key] != int(value):
                raise RecalignInputError(
                    f"{key} is {info[key]} in {PROJECTOR_META} but {int(value)} in the weights", source=file
                )
    head = _check_item_head(file, tensors, table, w_out, info)
    module = ItemTokens(table, int(w_out.shape[0]), int(w_in.shape[0]),
                        {k: v for k, v in info.items() if k in ("recommender", "catalogue_sha256", "fit")})  # fmt: skip
    if head:
        module.add_item_head()
    module.load_state_dict(tensors)
    module.source = str(file)
    return module


HEAD_KEYS = ("item_head.weight", "item_bias")


def _check_item_head(file: Path, tensors: dict, table: torch.Tensor, w_out: torch.Tensor, info: dict) -> bool:
    """Whether the file holds an item head; a one-line error if it holds half of one, one of the wrong
    shape (``[d_lm, d_rec]`` and ``[n_items]``), or the JSON record disagrees. Files written before the
    head existed hold neither tensor nor key: a module without a head."""
    present = [k for k in HEAD_KEYS if k in tensors]
    if present and len(present) < len(HEAD_KEYS):
        missing = next(k for k in HEAD_KEYS if k not in tensors)
        raise RecalignInputError(f"hybrid projector's item head lacks tensor '{missing}'", source=file)
    head = bool(present)
    if head:
        want = {
            "item_head.weight": (int(w_out.shape[0]), int(table.shape[1])),
            "item_bias": (int(table.shape[0]),),
        }
        for key, shape in want.items():
            if tuple(tensors[key].shape) != shape:
                raise RecalignInputError(
                    f"hybrid projector's {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                    f"(d_lm, d_rec, n_items of its item table and projector)",
                    source=file,
                )
    if "item_head" in info and bool(info["item_head"]) != head:
        raise RecalignInputError(
            f"item_head is {str(bool(info['item_head'])).lower()} in {PROJECTOR_META} but the weights "
            f"{'hold' if head else 'lack'} one",
            source=file,
        )
    return head


def load_item_tokens_state(model, directory: str | Path) -> bool:
    """Restore the attached module's weights from ``directory`` (a checkpoint); False if it has no file.

    Used on resume: the module (and its place in the optimiser) already exists, only its values change.
    """
    module = item_tokens_of(model)
    file = Path(directory) / PROJECTOR_FILE
    if module is None or not file.is_file():
        return False
    saved = load_item_tokens(file)
    if saved.shapes() != module.shapes():
        raise RecalignInputError(
            f"projector shapes {saved.shapes()} differ from the run's {module.shapes()}", source=file
        )
    if saved.has_item_head != module.has_item_head:
        raise RecalignInputError(
            f"checkpoint's projector {'has' if saved.has_item_head else 'lacks'} an item head, the run's "
            f"{'has' if module.has_item_head else 'does not'}",
            source=file,
        )
    with torch.no_grad():
        for name, tensor in saved.state_dict().items():
            module.state_dict()[name].copy_(tensor)
    return True
