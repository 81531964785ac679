"""Tiny models shared by the LM tests: a BPE tokenizer trained on movie-like text and a 2-layer Llama."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from recalign.data.dataset import RecDataset
from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer

TITLES = [
    "Toy Story (1995)",
    "Heat (1995)",
    "Star Wars (1977)",
    "Star Wars: Episode I (1999)",
    "Alien (1979)",
    "Aliens (1986)",
    "Fargo (1996)",
    "Casablanca (1942)",
    "Usual Suspects, The (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
    "Jumanji (1995)",
    "GoldenEye (1995)",
    "Braveheart (1995)",
    "Apollo 13 (1995)",
    "Batman Forever (1995)",
    "Clueless (1995)",
    "Seven (Se7en) (1995)",
    "Pulp Fiction (1994)",
    "Forrest Gump (1994)",
    "Lion King, The (1994)",
    "Mask, The (1994)",
    "Speed (1994)",
    "True Lies (1994)",
    "Titanic (1997)",
    "Contact (1997)",
]


def make_tiny_dataset(name: str = "ml-tiny") -> RecDataset:
    rows = []
    for u in range(6):
        for k in range(12):
            item = (u * 5 + k * 3) % len(TITLES)
            rows.append({"user": f"u{u}", "item": f"i{item}", "timestamp": 1000 * k + u})
    inter = pd.DataFrame(rows).drop_duplicates(["user", "item"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(len(TITLES))], "title": TITLES})
    return RecDataset.from_frames(name, inter, items)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU OpenMP spin-waiting
    makes them 10-20x slower with 2 threads than with 1. Scoped to these tests, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dataset():
    """Factory: ``tiny_dataset(name="ml-tiny")`` -> a 6-user dataset over :data:`TITLES`."""
    return make_tiny_dataset


@pytest.fixture
def titles() -> list[str]:
    return list(TITLES)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = (
        TITLES * 4
        + [
            "This user has enjoyed these movies, in this order: Answer: candidates recommend predict next",
            "Interaction history of a user movies oldest newest choose exactly one from this list",
        ]
        * 4
    )
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=0)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """The tiny tokenizer with a ChatML template, to test the chat branch of the tokenisation rule."""
    from recalign.lm.loading import train_bpe_tokenizer as train

    tok = train(TITLES * 4 + ["user assistant system"] * 4, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
        "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return tok
