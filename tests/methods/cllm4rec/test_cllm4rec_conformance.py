"""CLLM4Rec passes the shared recommender conformance suite (:mod:`recalign.testing`) on a tiny Llama.

A few pretraining and fine-tuning steps of the ID tables on the chain data: enough for the interface,
reproducibility and leakage checks; the tiny backbone is not asked to learn the chains.
"""

from __future__ import annotations

from functools import cache

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.recommender import CLLM4RecRecommender
from recalign.testing import RecommenderConformance, chain_data


@cache
def _backbone():
    ds, _ = chain_data("loo")
    texts = [f"Item {k}" for k in range(ds.n_items)] * 3
    texts += [
        "has interacted with; the user will interact with: is titled writes the following review for"
    ] * 5
    tok = train_bpe_tokenizer(texts, vocab_size=200)
    return build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0), tok


def _config(seed: int) -> CLLM4RecConfig:
    cfg = CLLM4RecConfig(progress=False, seed=seed, threads=1)
    cfg.model.backbone = "tiny"
    cfg.pretrain.collab_steps, cfg.pretrain.content_ratio = 4, 1
    cfg.pretrain.batch_size, cfg.pretrain.content_batch_size, cfg.pretrain.max_items = 8, 8, 8
    cfg.pretrain.lr, cfg.pretrain.checkpoint_every = 3e-2, 0
    cfg.finetune.steps, cfg.finetune.batch_size, cfg.finetune.max_items = 4, 8, 10
    cfg.finetune.lr, cfg.finetune.checkpoint_every = 3e-2, 0
    cfg.eval.batch_size = 32
    cfg.validate()
    return cfg


class TestCLLM4RecConformance(RecommenderConformance):
    checks_quality = False

    def make_recommender(self, seed):
        backbone, tok = _backbone()
        return CLLM4RecRecommender(_config(seed), backbone=backbone, base_tokenizer=tok)
