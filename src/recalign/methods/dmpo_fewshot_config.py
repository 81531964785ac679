"""The settings of DMPO's few-shot recipe: one config holding the whole budget, and the two genre domains.

Part of :mod:`recalign.methods.dmpo_fewshot` (which re-exports these names and describes the recipe):
:class:`DMPOFewShotConfig` (``configs/dmpo_fewshot_ml100k.yaml``) with its evaluation section
:class:`DMPOEvalConfig`, and :func:`domain_data`, the in-genre split and its cross-genre complement.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Literal

from recalign.config import Ge, Gt, cfg_field, check_constraints
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.lm.lora import LoRAConfig
from recalign.methods import PreparedData, load_data
from recalign.training.config import TrainingConfig

PromptName = Literal["pairwise", "candidates"]
DOMAINS = ("in-genre", "cross-genre")
#: The action/thriller-like half of ML-100K's genres; the cross-genre half is every other item.
DEFAULT_GENRES = [
    "Action", "Adventure", "Crime", "Fantasy", "Film-Noir", "Horror", "Mystery", "Sci-Fi", "Thriller", "War",
    "Western",
]  # fmt: skip


def _data() -> DataPrepareConfig:
    cfg = DataPrepareConfig(dataset="ml-100k", split="llara", candidates=20)
    cfg.preprocess.item_genres_include = list(DEFAULT_GENRES)
    return cfg


def _sft_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=1e-3, epochs=2.0, batch_size=4, warmup_steps=2, save_steps=25,
                          logging_steps=5)  # fmt: skip


def _pref_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=2e-4, epochs=1.0, batch_size=4, warmup_steps=2, save_steps=25,
                          logging_steps=5)  # fmt: skip


@dataclass
class DMPOEvalConfig:
    """Evaluation of every few-shot model."""

    n_test: int = cfg_field(500, "test rows per domain, sampled with the seed (0: the whole test stage)")
    max_pairs: int = cfg_field(1, "pairwise protocol: negatives paired with the target per test row")
    protocols: list[str] = cfg_field(["pairwise", "candidates"], "pairwise and/or candidates")
    domains: list[str] = cfg_field(list(DOMAINS), "in-genre and/or cross-genre")
    batch_size: int = cfg_field(8, "prompts per scoring pass")


@dataclass
class DMPOFewShotConfig:
    """DMPO's few-shot regime: SFT on ``n_sft`` rows, then each loss on ``n_pref`` rows x K negatives."""

    model: str = cfg_field("smollm2", "base model the SFT adapter is trained on")
    prompt: PromptName = cfg_field(
        "pairwise",
        "prompt trained on (both stages): pairwise (the paper's two-item ranking prompt, answers are "
        "orderings) or candidates (the SFT candidate list, answers are titles)",
    )
    losses: list[str] = cfg_field(["dmpo", "sdpo"], "preference losses compared at equal budget")
    negatives: Annotated[int, Ge(1, show_value=True)] = cfg_field(3, "K negatives per preference row")
    beta: Annotated[float, Gt(0, show_value=True)] = cfg_field(1.0, "β of the implicit reward")
    nll_weight: float = cfg_field(1.0, "DMPO's λ on the chosen answers' NLL (0 disables)")
    data: DataPrepareConfig = cfg_field(
        help="dataset and split; preprocess.item_genres_include = the in-genre half",
        default_factory=_data,
    )
    n_sft: Annotated[int, Ge(1, show_value=True)] = cfg_field(100, "SFT rows (one prompt each)")
    n_pref: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        100, "preference rows (each with K negatives: n_pref*K pairs)"
    )
    seed: int = cfg_field(0, "seed of the SFT rows, negatives, option orders, phrasing and test rows")
    pref_seed: int = cfg_field(1, "seed drawing the preference rows (apart from the SFT rows)")
    max_history: int = cfg_field(10, "history items in the prompt (most recent)")
    dtype: str = cfg_field("auto", "base weights: auto, float32 or bfloat16 (LoRA stays float32)")
    threads: int = cfg_field(1, "torch CPU threads (0: torch's default)")
    resume: bool = cfg_field(True, "skip finished stages and continue unfinished ones from their checkpoints")
    lora: LoRAConfig = cfg_field(help="LoRA adapter of each stage", default_factory=LoRAConfig)
    sft_training: TrainingConfig = cfg_field(help="SFT stage budget", default_factory=_sft_training)
    pref_training: TrainingConfig = cfg_field(help="preference stage budget", default_factory=_pref_training)
    eval: DMPOEvalConfig = cfg_field(help="evaluation", default_factory=DMPOEvalConfig)

    def validate(self) -> None:
        bad = [loss for loss in self.losses if loss not in ("dmpo", "sdpo")]
        if bad:
            raise RecalignInputError(f"unknown loss {bad[0]!r} (choose from dmpo, sdpo)", field="losses")
        check_constraints(self, nested=False)  # negatives, n_sft, n_pref >= 1; beta > 0
        if self.data.candidates - 1 < self.negatives:
            raise RecalignInputError(
                f"{self.negatives} negatives need at least {self.negatives + 1} candidates", field="negatives"
            )
        for p in self.eval.protocols:
            if p not in ("pairwise", "candidates"):
                raise RecalignInputError(f"unknown protocol {p!r}", field="eval.protocols")
        for d in self.eval.domains:
            if d not in DOMAINS:
                raise RecalignInputError(f"unknown domain {d!r} (choose from {', '.join(DOMAINS)})",
                                         field="eval.domains")  # fmt: skip
        if "cross-genre" in self.eval.domains and not self.data.preprocess.item_genres_include:
            raise RecalignInputError(
                "cross-genre evaluation needs data.preprocess.item_genres_include (the in-genre half)",
                field="eval.domains",
            )
        self.data.validate()
        self.lora.validate()
        self.sft_training.validate()
        self.pref_training.validate()

    def method(self, stage: str) -> str:
        """``sft-fewshot-pairwise``, ``dmpo-k3-fewshot-pairwise``, ``sdpo-k3-fewshot-candidates``, ..."""
        head = "sft" if stage == "sft" else f"{stage}-k{self.negatives}"
        return f"{head}-fewshot-{self.prompt}"


def domain_data(cfg: DMPOFewShotConfig) -> dict[str, PreparedData]:
    """The in-genre split (``item_genres_include``) and the cross-genre one (the same list excluded)."""
    out = {"in-genre": load_data(cfg.data)}
    if "cross-genre" in cfg.eval.domains:
        other = copy.deepcopy(cfg.data)
        other.preprocess.item_genres_exclude = list(cfg.data.preprocess.item_genres_include)
        other.preprocess.item_genres_include = []
        out["cross-genre"] = load_data(other)
    return out


__all__ = ["DEFAULT_GENRES", "DOMAINS", "DMPOEvalConfig", "DMPOFewShotConfig", "PromptName", "domain_data"]
