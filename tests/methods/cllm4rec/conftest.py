"""A tiny world for CLLM4Rec tests: 16 users in two taste clusters over 40 items, a BPE vocabulary
trained on the documents' words, and a 2-layer Llama — small enough that every test runs in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recalign.data.dataset import RecDataset
from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.documents import item_description
from recalign.methods.cllm4rec.protocol import holdout_split

N_USERS, N_ITEMS = 16, 40
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def make_dataset(seed: int = 0) -> RecDataset:
    """Users 0-7 watch items 0-19, users 8-15 items 20-39 (10-14 items each, random times)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        pool = np.arange(20) if u < N_USERS // 2 else np.arange(20, 40)
        chosen = rng.choice(pool, size=int(rng.integers(10, 15)), replace=False)
        for t, i in enumerate(chosen):
            rows.append((f"u{u}", f"m{i}", 1000 * u + t, 4))
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame(
        {
            "item": [f"m{i}" for i in range(N_ITEMS)],
            "title": [f"Movie number {i} ({1980 + i})" for i in range(N_ITEMS)],
            "year": [str(1980 + i) for i in range(N_ITEMS)],
            "genres": [GENRES[i % 4] + "|" + GENRES[(i // 4) % 4] for i in range(N_ITEMS)],
        }
    )
    return RecDataset.from_frames("tiny", inter, items)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead; on a shared CPU extra intra-op threads only spin
    (measured: 10x slower with 2 threads under load). Restored after each test."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def dataset() -> RecDataset:
    return make_dataset()


@pytest.fixture(scope="session")
def split(dataset):
    return holdout_split(dataset, 0.2, seed=0, n_candidates=5)


@pytest.fixture(scope="session")
def base_tokenizer(dataset):
    texts = [item_description(dataset, i) for i in range(dataset.n_items)]
    texts += [
        "has interacted with; the user will interact with: is titled writes the following review for"
    ] * 5
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def backbone(base_tokenizer):
    return build_tiny_llama(base_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


def tiny_config(**over) -> CLLM4RecConfig:
    cfg = CLLM4RecConfig(progress=False)
    cfg.model.backbone = "tiny"
    cfg.pretrain.collab_steps = 6
    cfg.pretrain.content_ratio = 1
    cfg.pretrain.batch_size = 4
    cfg.pretrain.content_batch_size = 8
    cfg.pretrain.max_items = 8
    cfg.pretrain.lr = 3e-2
    cfg.pretrain.checkpoint_every = 0
    cfg.finetune.steps = 6
    cfg.finetune.batch_size = 4
    cfg.finetune.max_items = 10
    cfg.finetune.lr = 3e-2
    cfg.finetune.checkpoint_every = 0
    cfg.eval.batch_size = 8
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cfg.validate()
    return cfg


@pytest.fixture
def make_config():
    """Factory of tiny configs; keyword ``section__field=value`` overrides one field."""
    return tiny_config


@pytest.fixture
def make_model(dataset, backbone, base_tokenizer):
    """Factory of fresh (model, ID tokenizer) pairs around the shared frozen tiny backbone."""
    from recalign.methods.cllm4rec.recommender import build_model

    def make(cfg: CLLM4RecConfig | None = None):
        return build_model(cfg or tiny_config(), dataset.n_users, dataset.n_items, backbone, base_tokenizer)

    return make
