"""Inference and the :class:`~recalign.recommender.Recommender` adapter.

Scoring a user is one forward pass: the recommendation prompt with the user's history (every distinct
item, in time order; the most recent ``finetune.max_items`` if that cap is set) goes through the frozen backbone on the
collaborative side, and the item head turns the last hidden state into a log-probability for every
item at once. ``score_all`` returns those raw scores (the shared protocols exclude seen items
themselves and keep a re-consumed target); :meth:`CLLM4RecRecommender.recommend` is the serving
path and never returns an item the user has already seen.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.documents import collate_lm, content_documents, rec_prompt
from recalign.methods.cllm4rec.model import CLLM4RecModel
from recalign.methods.cllm4rec.protocol import top_k_excluding_seen
from recalign.methods.cllm4rec.training import StageResult, TrainingData, run_stage
from recalign.methods.cllm4rec.vocab import IDTokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16``; ``auto`` = bfloat16 where the CPU has native bf16 units."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); False where it cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_model(
    cfg: CLLM4RecConfig, n_users: int, n_items: int, backbone=None, base_tokenizer=None
) -> tuple[CLLM4RecModel, IDTokenizer]:
    """Load (or take) the backbone, freeze it, add the ID tables and wrap the tokenizer.

    The model remembers the depth it runs with: ``model.depth`` (decoder layers used) and
    ``model.full_depth`` (layers of the backbone as loaded). The caller's backbone is frozen and
    converted in place (dtype, attention kernel); truncation makes a copy that shares its weights.
    """
    if backbone is None or base_tokenizer is None:
        from recalign.lm.loading import load_model

        backbone, base_tokenizer = load_model(cfg.model.backbone)
    full_depth = decoder_depth(backbone)
    impl = "eager" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    if getattr(backbone.config, "_attn_implementation", impl) != impl and hasattr(
        backbone, "set_attn_implementation"
    ):
        backbone.set_attn_implementation(impl)  # before truncation: the layers share this setting
    if cfg.model.num_layers is not None:
        backbone = truncated_copy(backbone, cfg.model.num_layers)
    dtype = resolve_dtype(cfg.model.dtype)
    if next(backbone.parameters()).dtype != dtype:
        backbone = backbone.to(dtype)
    vocab = max(len(base_tokenizer), backbone.get_input_embeddings().weight.shape[0])
    tok = IDTokenizer(base_tokenizer, n_users, n_items, vocab_size=vocab, add_bos=cfg.model.add_bos)
    model = CLLM4RecModel(backbone, n_users, n_items, vocab, init_std=cfg.model.init_std, seed=cfg.seed)
    model.full_depth, model.depth = full_depth, decoder_depth(backbone)
    return model, tok


@contextmanager
def inference_attention(backbone, setting: str):
    """Forward-only passes with sdpa when the config says ``auto``; the training kernel is restored after.

    ``auto`` trains with eager attention (sdpa's CPU backward is the slow part of a step), but inference
    has no backward, and there sdpa's fused kernel is the faster one on long prompts (SmolLM2, one CPU
    thread, float32: 8.3 s vs 14.6 s for 4 prompts of 500 tokens, equal at 32 x 60;
    ``results/cllm4rec_attention.json``) -- and validation and evaluation prompts hold whole histories
    (up to ~530 tokens on ML-100K). Scores agree to float rounding (~1e-4). An explicit ``eager`` or
    ``sdpa`` is used as set."""
    before = getattr(backbone.config, "_attn_implementation", None)
    switch = setting == "auto" and before == "eager" and hasattr(backbone, "set_attn_implementation")
    if switch:
        backbone.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            backbone.set_attn_implementation(before)


def _layer_list(backbone):
    from torch import nn

    stack = backbone.base_model
    name = next(
        (a for a in ("layers", "h", "blocks") if isinstance(getattr(stack, a, None), nn.ModuleList)), None
    )
    if name is None:
        raise RecalignInputError(
            f"cannot find the decoder layers of {type(backbone).__name__}", field="model.num_layers"
        )
    return stack, name


def decoder_depth(backbone) -> int:
    stack, name = _layer_list(backbone)
    return len(getattr(stack, name))


def truncated_copy(backbone, n: int):
    """A shallow copy of ``backbone`` that runs only its first ``n`` decoder layers (the caller's model
    keeps all of its layers; the weights are shared, not copied)."""
    import copy

    stack, name = _layer_list(backbone)
    if n > len(getattr(stack, name)):
        raise RecalignInputError(
            f"the backbone has only {len(getattr(stack, name))} layers, asked for {n}",
            field="model.num_layers",
        )
    if n == len(getattr(stack, name)):
        return backbone
    new = copy.copy(backbone)
    new._modules = dict(backbone._modules)
    new.config = copy.deepcopy(backbone.config)
    base_attr = backbone.base_model_prefix
    new_stack = copy.copy(stack)
    new_stack._modules = dict(stack._modules)
    new_stack.config = new.config
    new._modules[base_attr] = new_stack
    truncate_layers(new, n)
    return new


def truncate_layers(backbone, n: int) -> None:
    """Keep the first ``n`` decoder layers (in place). The final norm and the LM head stay, so hidden
    states keep their usual scale; only the depth of the frozen computation changes."""
    stack, name = _layer_list(backbone)
    layers = getattr(stack, name)
    if n > len(layers):
        raise RecalignInputError(
            f"the backbone has only {len(layers)} layers, asked for {n}", field="model.num_layers"
        )
    setattr(stack, name, layers[:n])
    for cfg_name in ("num_hidden_layers", "n_layer"):
        if hasattr(backbone.config, cfg_name):
            setattr(backbone.config, cfg_name, n)
    if isinstance(getattr(backbone.config, "layer_types", None), list):
        backbone.config.layer_types = backbone.config.layer_types[:n]


CONTENT_CHECK_DOCS = 64


@torch.no_grad()
def untrained_content_loss(model: CLLM4RecModel, data: TrainingData, cfg: CLLM4RecConfig) -> float:
    """Mean next-word loss of the content LM on the first ``CONTENT_CHECK_DOCS`` content documents
    (epoch 0 order), with the ID tables as they are (freshly initialised before training)."""
    docs = content_documents(data.tokenizer, data.corpus, cfg.pretrain.max_text_tokens, cfg.seed, 0)
    docs = [d for d in docs if d.targets][:CONTENT_CHECK_DOCS]
    if not docs:
        return float("nan")
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(docs), 16):
        chunk = docs[start : start + 16]
        k = sum(len(d.targets) for d in chunk)
        total += float(model.content_lm_loss(collate_lm(chunk, data.tokenizer.pad_id))) * k
        n += k
    model.train(was_training)
    return total / n


def check_backbone_depth(model: CLLM4RecModel, data: TrainingData, cfg: CLLM4RecConfig) -> dict:
    """What the records say about the backbone; refuses a truncated backbone that cannot do the content LM.

    A truncated backbone (``model.num_layers`` below its depth) still ends in the full model's final
    norm and word head, which expect the *last* layer's hidden states: if the content-LM loss of that
    combination is not below ``ln(vocab)`` (a uniform guess over the words), the content LM and the
    mutual regulariser learn nothing useful, so the run is refused with a one-line error.
    """
    vocab = int(model.backbone.get_output_embeddings().weight.shape[0])
    bound = float(np.log(vocab))
    loss = untrained_content_loss(model, data, cfg)
    depth, full = getattr(model, "depth", None), getattr(model, "full_depth", None)
    if depth is not None and full is not None and depth < full and not loss < bound:
        raise RecalignInputError(
            f"model.num_layers={depth} (of {full}): the truncated backbone's untrained content-LM loss is "
            f"{loss:.2f}, not below the uniform bound ln({vocab}) = {bound:.2f}, so the content LM cannot "
            "learn from it; use the full backbone (model.num_layers=null)",
            field="model.num_layers",
        )
    return {
        "backbone_layers": depth,
        "backbone_full_layers": full,
        "untrained_content_loss": round(loss, 4),
        "uniform_bound": round(bound, 4),
    }


def validation_examples(split: Split, max_users: int = 0) -> pd.DataFrame | None:
    """The split's ``valid`` stage with a ``targets`` set per row (the held-out set on ``holdout``, the
    one valid item on ``loo`` / ``llara``); None when the split has no validation stage."""
    ex = split.stage("valid")
    if not len(ex):
        return None
    if "targets" not in ex.columns or ex["targets"].isna().any():
        ex = ex.assign(targets=[np.asarray([t], dtype=np.int64) for t in ex["target"]])
    ex = ex[[len(t) > 0 for t in ex["targets"]]]
    if max_users:
        ex = ex.iloc[:max_users]
    return ex if len(ex) else None


def make_validator(cfg: CLLM4RecConfig, tokenizer: IDTokenizer, split: Split):
    """``model -> validation Recall@20`` on the split's valid stage (None when it has none)."""
    from recalign.methods.cllm4rec.protocol import evaluate_multi_target

    ex = validation_examples(split, cfg.eval.valid_max_users)
    if ex is None:
        return None

    def validate(model: CLLM4RecModel) -> float:
        rec = CLLM4RecRecommender(cfg, model=model, tokenizer=tokenizer)
        return evaluate_multi_target(rec, ex, ks=(20,))["Recall@20"]

    return validate


def recent_unique(history: np.ndarray, k: int) -> list[int]:
    """The ``k`` most recent distinct items of a chronological history, oldest first (``k`` 0 = all)."""
    seen: set[int] = set()
    out: list[int] = []
    for it in reversed(np.asarray(history, dtype=np.int64).tolist()):
        if it not in seen:
            seen.add(it)
            out.append(it)
            if len(out) == k:
                break
    return out[::-1]


class CLLM4RecRecommender:
    """CLLM4Rec behind the shared ``fit`` / ``score_candidates`` / ``score_all`` interface."""

    def __init__(
        self,
        config: CLLM4RecConfig | None = None,
        *,
        model: CLLM4RecModel | None = None,
        tokenizer: IDTokenizer | None = None,
        backbone=None,
        base_tokenizer=None,
    ) -> None:
        self.config = config or CLLM4RecConfig()
        self.config.validate()
        self.name = self.config.method
        self.model, self.tokenizer = model, tokenizer
        self._backbone, self._base_tokenizer = backbone, base_tokenizer
        self.results: list[StageResult] = []

    # ------------------------------------------------------------------ training
    def fit(
        self, dataset: RecDataset, split: Split, output_dir: str | Path | None = None
    ) -> CLLM4RecRecommender:
        """Pretrain then fine-tune on ``split``'s training sequences (checkpoints under ``output_dir``),
        with ``config.threads`` torch threads (as the pipeline's stages: results do not depend on the
        caller's thread setting)."""
        from recalign.baselines.common import torch_threads

        with torch_threads(self.config.threads):
            return self._fit(dataset, split, output_dir)

    def _fit(self, dataset: RecDataset, split: Split, output_dir) -> CLLM4RecRecommender:
        if self.model is None:
            self.model, self.tokenizer = build_model(
                self.config, dataset.n_users, dataset.n_items, self._backbone, self._base_tokenizer
            )
        data = TrainingData.build(self.tokenizer, dataset, split.train_sequences(dataset))
        self.backbone_info = check_backbone_depth(self.model, data, self.config)
        validate = make_validator(self.config, self.tokenizer, split)
        out = Path(output_dir) if output_dir is not None else None
        for stage in ("pretrain", "finetune"):
            ckpt = out / "checkpoints" / stage if out is not None else None
            self.results.append(run_stage(self.model, data, self.config, stage, ckpt, validate=validate))
        return self

    # ------------------------------------------------------------------ scoring
    def _check(self, examples: pd.DataFrame) -> None:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("CLLM4RecRecommender is not fitted; call fit(dataset, split) first")
        users = examples["user"].to_numpy()
        if len(users) and (users.min() < 0 or users.max() >= self.model.n_users):
            raise RecalignInputError(
                f"user index {int(users.max())} is outside the {self.model.n_users} users the model knows"
            )
        for h in examples["history"]:
            if len(h) and int(np.max(h)) >= self.model.n_items:
                raise RecalignInputError(
                    f"item index {int(np.max(h))} is outside the {self.model.n_items} items the model knows"
                )

    @torch.no_grad()
    def log_probs(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        """``[n, n_items]`` item-head log-probabilities, one forward pass per batch of prompts."""
        assert self.model is not None and self.tokenizer is not None
        self.model.eval()
        max_items, bs = self.config.finetune.max_items, self.config.eval.batch_size
        prompts = [
            rec_prompt(self.tokenizer, int(u), recent_unique(h, max_items)) for u, h in zip(users, histories)
        ]
        out = torch.empty((len(prompts), self.model.n_items))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length
        with inference_attention(self.model.backbone, self.config.model.attn_implementation):
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                chunk = [prompts[i] for i in idx]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, : len(p)] = torch.tensor(p)
                    mask[r, : len(p)] = 1
                out[torch.tensor(idx)] = self.model.rec_item_log_probs(ids, mask)
        return out

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        self._check(examples)
        return self.log_probs(examples["user"].to_numpy(), list(examples["history"])).numpy()

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        cands = np.stack([np.asarray(c, dtype=np.int64) for c in examples["candidates"]])
        return np.take_along_axis(self.score_all(examples), cands, axis=1)

    def recommend(self, user: int, history, k: int = 10) -> list[int]:
        """Top-``k`` items for one user, never an item already in ``history``."""
        ex = pd.DataFrame({"user": [int(user)], "history": [np.asarray(history, dtype=np.int64)]})
        scores = self.score_all(ex)
        unseen = self.model.n_items - len(np.unique(ex["history"].iloc[0]))
        return top_k_excluding_seen(scores, [ex["history"].iloc[0]], min(k, unseen))[0].tolist()
