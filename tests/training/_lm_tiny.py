"""Tiny on-disk fixtures for the SFT / evaluate / recommend tests: a MovieLens-100K-format dataset
directory (u.data + u.item), and a tiny Llama with an in-process BPE tokenizer saved as a model directory.

Imported by tests in other directories (they add this directory to ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer

TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Star Wars (1977)", "Alien (1979)", "Aliens (1986)",
    "Fargo (1996)", "Casablanca (1942)", "Babe (1995)", "Jumanji (1995)", "GoldenEye (1995)",
    "Braveheart (1995)", "Apollo 13 (1995)", "Clueless (1995)", "Pulp Fiction (1994)",
    "Forrest Gump (1994)", "Speed (1994)", "True Lies (1994)", "Titanic (1997)", "Contact (1997)",
    "Vertigo (1958)", "Psycho (1960)", "Rocky (1976)", "Jaws (1975)", "Annie Hall (1977)",
]  # fmt: skip

N_USERS = 16
PER_USER = 12


def write_ml100k_dir(directory: Path) -> Path:
    """u.data / u.item in the real ML-100K formats (tab-separated; pipe-separated Latin-1, 19 genres)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, N_USERS + 1):
        items = rng.choice(len(TITLES), size=PER_USER, replace=False) + 1
        for k, it in enumerate(items):
            lines.append(f"{u}\t{it}\t{int(rng.integers(1, 6))}\t{880000000 + 1000 * k + u}")
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    genres = "|".join(["0"] * 18 + ["1"])
    item_lines = [f"{i}|{t}|01-Jan-1995||http://x|{genres}" for i, t in enumerate(TITLES, 1)]
    (directory / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
    return directory


def tiny_tokenizer():
    texts = (
        TITLES * 4
        + [
            "This user has enjoyed these movies, in this order: From the following candidates, which movie "
            "will the user choose next? Reply with the title of one candidate only. Answer:",
            "A user's most recent movies, oldest first: Candidates: Recommend the one candidate movie this "
            "user is most likely to choose next. Give its exact title.",
            "Interaction history of a user (movies, from oldest to newest): Predict the next movie this user "
            "will interact with. It is one of these candidates:",
            "You are a recommender system. The user liked: Choose exactly one movie from this list for the "
            "user to enjoy next:",
        ]
        * 3
    )
    return train_bpe_tokenizer(texts, vocab_size=400)


def widen_embeddings(model, scale: float = 6.0) -> None:
    """Scale the (tied) embeddings of a freshly initialised model, in place.

    With the default 0.02-std init and a frozen final RMSNorm, every logit of a random tiny Llama is
    bounded to about +-0.6, so a LoRA-only update cannot move the output distribution away from
    uniform, whatever it learns. A pretrained model has no such bound; scaling the embeddings gives the
    tiny model the same property, which is what makes "the loss falls" a meaningful test of LoRA training.
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 1-layer Llama (hidden 32) + tokenizer saved as safetensors: loadable by ``load_model(dir)``."""
    tok = tiny_tokenizer()
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    widen_embeddings(model)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def tiny_env(root: Path) -> tuple[Path, Path, Path]:
    """``(root, data_dir, model_dir)``: the tiny ML-100K directory and tiny Llama written under ``root``."""
    return root, write_ml100k_dir(root / "ml"), write_tiny_model(root / "model")


#: Optimisation of the tiny SFT runs: a high constant learning rate, so a dozen steps move the loss.
TINY_TRAINING = {
    "learning_rate": 3e-2,
    "lr_scheduler": "constant",
    "max_steps": 12,
    "batch_size": 4,
    "save_steps": 6,
    "logging_steps": 1,
    "progress": False,
}


def sft_overrides(data_dir: Path, model_dir: Path, **over) -> dict:
    """SFTConfig overrides for the tiny dataset and model (for ``load_config(SFTConfig, overrides=...)``);
    ``over`` replaces top-level keys whole (``training={...}`` replaces TINY_TRAINING)."""
    base = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
        "n_train": 32,
        "max_history": 4,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": dict(TINY_TRAINING),
        "eval": {"n_test": 8, "protocols": ["candidates", "generation"], "max_new_tokens": 8},
    }
    return {**base, **over}
