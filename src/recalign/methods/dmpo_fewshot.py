"""DMPO's few-shot setting (Bai et al.): few-shot SFT, then DMPO or S-DPO at equal budget, in-genre and
cross-genre, on the prompt the model is evaluated with.

One config (:class:`DMPOFewShotConfig`, ``configs/dmpo_fewshot_ml100k.yaml``) holds the whole budget,
so the benchmark and the CLI-free API cannot disagree about it:

1. **SFT**: ``n_sft`` training rows (default 100), one prompt each, a fresh LoRA adapter on the base
   model, ``sft_training`` (epochs, batch). ``prompt: pairwise`` (the paper's): each row is a
   pair-ranking prompt naming the target and one seeded negative candidate, the answer the ordering
   "target, negative" (:mod:`recalign.methods.dmpo`); ``prompt: candidates``: the SFT candidate prompt,
   the answer the target's title.
2. **Preference stage**, once per loss in ``losses`` (``dmpo``, ``sdpo``), each from the merged SFT model
   (the reference) with a fresh adapter, on ``n_pref`` further rows (``pref_seed``, apart from the SFT
   rows) with K = ``negatives`` random negatives from each row's candidates: ``n_pref * K`` preference
   pairs. ``pairwise``: K pair-ranking prompts per row, chosen = "target, negative_i", rejected = the
   reversal; the row's loss combines its K prompts as DMPO does its K negatives,
   ``-log σ(β·mean_i r(chosen_i) - β·mean_i r(rejected_i)) + λ·NLL`` (S-DPO: the softmax over the K
   rejected rewards against the mean chosen one). K = 1 is DPO. ``candidates``: one candidate prompt
   per row with the target and its K negatives as answers (``recalign align``'s objective).
3. **Evaluation** of every model (SFT and each aligned one) on the **in-genre** test stage (the genres
   trained on) and the **cross-genre** one (the complementary genres of ML-100K, *the same users*: not a
   second data set), by the pairwise protocol (``max_pairs`` negatives per test row, both orderings
   scored, :func:`recalign.methods.dmpo.pairwise_accuracy`) and by candidate ranking (HR@k over the
   split's 20 candidates). Each record carries the true counts of what was trained on
   (``n_sft_rows``, ``n_pref_rows``, ``n_pref_pairs``, epochs, steps, rows seen), the prompt trained on
   and the prompt evaluated with; aligned models' pairwise records add the paired difference to SFT on
   the same pairs (``vs_sft``: mean and standard error).

Outputs: ``<out>/config.yaml``, ``<out>/<stage>/adapter``, ``<out>/<stage>/pairs_<domain>.json`` (every
pair's two scores), ``<out>/records.json``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from recalign.config import cfg_field
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, current_command, write_records
from recalign.lm.lora import LoRAConfig
from recalign.methods import PreparedData, load_data, sample_examples, set_threads
from recalign.training.config import TrainingConfig

PromptName = Literal["pairwise", "candidates"]
DOMAINS = ("in-genre", "cross-genre")
#: The action/thriller-like half of ML-100K's genres; the cross-genre half is every other item.
DEFAULT_GENRES = [
    "Action", "Adventure", "Crime", "Fantasy", "Film-Noir", "Horror", "Mystery", "Sci-Fi", "Thriller", "War",
    "Western",
]  # fmt: skip
_SFT_NEG_SALT = 0xD3_0003


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
    negatives: int = cfg_field(3, "K negatives per preference row")
    beta: float = cfg_field(1.0, "β of the implicit reward")
    nll_weight: float = cfg_field(1.0, "DMPO's λ on the chosen answers' NLL (0 disables)")
    data: DataPrepareConfig = cfg_field(
        help="dataset and split; preprocess.item_genres_include = the in-genre half",
        default_factory=_data,
    )
    n_sft: int = cfg_field(100, "SFT rows (one prompt each)")
    n_pref: int = cfg_field(100, "preference rows (each with K negatives: n_pref*K pairs)")
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
        for name in ("negatives", "n_sft", "n_pref"):
            if getattr(self, name) < 1:
                raise RecalignInputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.data.candidates - 1 < self.negatives:
            raise RecalignInputError(
                f"{self.negatives} negatives need at least {self.negatives + 1} candidates", field="negatives"
            )
        if self.beta <= 0:
            raise RecalignInputError(f"must be > 0, got {self.beta}", field="beta")
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


# ---------------------------------------------------------------------- training rows
def sft_negatives(frame: pd.DataFrame, seed: int) -> list[list[int]]:
    """One seeded negative candidate per SFT row (the pair-ranking prompt's second item)."""
    out = []
    for user, position, target, cands in zip(
        frame["user"], frame["position"], frame["target"], frame["candidates"]
    ):
        negs = [int(c) for c in cands if int(c) != int(target)]
        rng = np.random.default_rng([int(seed), int(user), int(position), _SFT_NEG_SALT])
        out.append([negs[int(rng.integers(len(negs)))]])
    return out


def sft_rows(cfg: DMPOFewShotConfig, tok, data: PreparedData) -> tuple[list[dict], dict]:
    """Tokenised SFT examples (``{"prompt", "answers": [chosen]}``) and their counts."""
    from recalign.lm.prompts import encode_answer, encode_prompt

    frame = sample_examples(data.split.stage("train"), cfg.n_sft, cfg.seed, stage="train")
    if cfg.prompt == "candidates":
        from recalign.methods.sft import sft_examples

        examples = sft_examples(tok, data.dataset, frame, cfg.seed, cfg.max_history)
    else:
        from recalign.methods.dmpo import pair_ranking_rows

        groups = pair_ranking_rows(data.dataset, frame, sft_negatives(frame, cfg.seed), seed=cfg.seed,
                                   max_history=cfg.max_history)  # fmt: skip
        examples = [
            {"prompt": encode_prompt(tok, g[0].prompt), "answers": [encode_answer(tok, g[0].chosen)]}
            for g in groups
        ]
    return examples, {"n_sft_rows": len(examples), "sft_users": int(frame["user"].nunique())}


def preference_rows(cfg: DMPOFewShotConfig, tok, data: PreparedData) -> tuple[list[dict], dict]:
    """Tokenised preference examples (no reference yet) and their counts.

    ``pairwise``: ``{"prompt": [K prompt ids], "answers": [K x [chosen ids, rejected ids]]}`` per row;
    ``candidates``: ``{"prompt": ids, "answers": [target, K negatives]}``.
    """
    from recalign.lm.prompts import encode_answer, encode_prompt
    from recalign.methods.preference_data import sample_negatives

    frame = sample_examples(data.split.stage("train"), cfg.n_pref, cfg.pref_seed, stage="train")
    negatives = sample_negatives(frame, cfg.negatives, "random", seed=cfg.seed)
    if cfg.prompt == "candidates":
        from recalign.lm.prompts import examples_to_prompts
        from recalign.lm.reference import tokenize_preference_data
        from recalign.methods.preference_data import build_preference_data

        prompts = [p.prompt for p in examples_to_prompts(data.dataset, frame, seed=cfg.seed,
                                                          max_history=cfg.max_history)]  # fmt: skip
        # the same random draw as ``negatives`` above (same seed, strategy and rows)
        pref = build_preference_data(data.dataset, frame, k=cfg.negatives, seed=cfg.seed, prompts=prompts)
        p_ids, a_ids = tokenize_preference_data(tok, pref)
        examples = [{"prompt": p, "answers": a} for p, a in zip(p_ids, a_ids)]
        n_prompts = len(examples)
    else:
        from recalign.methods.dmpo import pair_ranking_rows

        groups = pair_ranking_rows(data.dataset, frame, negatives, seed=cfg.seed, max_history=cfg.max_history)
        examples = [
            {"prompt": [encode_prompt(tok, r.prompt) for r in g],
             "answers": [[encode_answer(tok, r.chosen), encode_answer(tok, r.rejected)] for r in g]}
            for g in groups
        ]  # fmt: skip
        n_prompts = sum(len(g) for g in groups)
    counts = {
        "n_pref_rows": len(examples),
        "n_pref_prompts": n_prompts,
        "n_pref_pairs": len(examples) * cfg.negatives,
        "pref_users": int(frame["user"].nunique()),
    }
    return examples, counts


def _flat(examples: list[dict]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Pairwise preference examples as flat (prompt, [chosen, rejected]) lists, row-major."""
    prompts = [p for ex in examples for p in ex["prompt"]]
    answers = [a for ex in examples for a in ex["answers"]]
    return prompts, answers


class PairRankingObjective:
    """DMPO / S-DPO over the K pair-ranking prompts of each row (module docstring, step 2).

    ``batch["prompt"]``: per row, K prompts; ``batch["answers"]``: per row, K ``[chosen, rejected]``;
    ``batch["ref"]``: ``[B, K, 2]`` reference log-probs. The row's policy and reference vectors are
    ``[mean_i chosen_i, rejected_1..K]``, fed to :func:`recalign.objectives.preference.preference_loss`:
    DMPO's ``-log σ(β r̄_w - (β/K) Σ r_i)`` is then exactly the mean margin of the K prompts.
    """

    def __init__(self, loss: str, beta: float, nll_weight: float = 0.0, impl: str = "packed") -> None:
        self.loss, self.beta, self.nll_weight, self.impl = loss, beta, nll_weight, impl

    def __call__(self, model, batch: dict):
        import torch

        from recalign.lm.scoring import answer_logprobs
        from recalign.objectives.preference import preference_loss

        k = len(batch["prompt"][0])
        if any(len(p) != k for p in batch["prompt"]):
            raise ValueError("every row of a batch needs the same number of pair prompts")
        prompts = [p for row in batch["prompt"] for p in row]
        answers = [a for row in batch["answers"] for a in row]
        scores = answer_logprobs(model, prompts, answers, impl=self.impl)
        b = len(batch["prompt"])
        pol = scores.sum[:, :2].reshape(b, k, 2)
        ref = torch.as_tensor(batch["ref"]).to(pol.dtype).to(pol.device).reshape(b, k, 2)
        policy = torch.cat([pol[:, :, 0].mean(dim=1, keepdim=True), pol[:, :, 1]], dim=1)
        reference = torch.cat([ref[:, :, 0].mean(dim=1, keepdim=True), ref[:, :, 1]], dim=1)
        kwargs: dict = {"beta": self.beta}
        if self.loss == "dmpo" and self.nll_weight > 0:
            n_tok = scores.n_tokens[:, 0].reshape(b, k).to(pol.dtype).clamp_min(1)
            kwargs["chosen_nll"] = (-pol[:, :, 0] / n_tok).mean(dim=1)
            kwargs["nll_weight"] = self.nll_weight
        out = preference_loss(self.loss, policy, reference, **kwargs)
        return out.loss, out.metrics()


# ---------------------------------------------------------------------- stages
def _steps(n_rows: int, training: TrainingConfig) -> int:
    per_epoch = math.ceil(n_rows / (training.batch_size * max(1, training.grad_accum)))
    return training.max_steps if training.max_steps > 0 else math.ceil(per_epoch * training.epochs)


def _rows_seen(n_rows: int, steps: int, training: TrainingConfig) -> int:
    """Rows fed to the optimiser: whole epochs of ``n_rows`` plus the part of the last one."""
    per_step = training.batch_size * max(1, training.grad_accum)
    per_epoch = math.ceil(n_rows / per_step)
    full, rest = divmod(steps, per_epoch)
    return int(full * n_rows + min(rest * per_step, n_rows))


@dataclass
class StageResult:
    name: str
    directory: Path
    counts: dict
    train_steps: int
    train_loss: float
    train_seconds: float
    from_cache: bool = False
    log_history: list = field(default_factory=list)


def _done(path: Path) -> dict | None:
    f = path / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_sft_stage(cfg: DMPOFewShotConfig, data: PreparedData, out: Path, progress: bool) -> StageResult:
    from recalign.lm.lora import attach_lora, load_lm, resolve_dtype, save_adapter
    from recalign.methods.sft import SFTObjective
    from recalign.training import train

    stage_dir = out / "sft"
    done = _done(stage_dir)
    if cfg.resume and done is not None:
        return StageResult(name="sft", directory=stage_dir, from_cache=True, **done)
    import torch

    model, tok, src = load_lm(cfg.model, merge=False, trainable=True, dtype=resolve_dtype(cfg.dtype))
    torch.manual_seed(cfg.sft_training.seed)
    model = attach_lora(model, cfg.lora)
    examples, counts = sft_rows(cfg, tok, data)
    training = copy.deepcopy(cfg.sft_training)
    training.resume = cfg.resume
    training.progress = training.progress and progress
    if progress:
        print(
            f"dmpo few-shot: SFT on {len(examples)} {cfg.prompt} rows, {training.epochs} epochs", flush=True
        )
    outcome = train(model, examples, SFTObjective(), training, stage_dir / "checkpoints")
    save_adapter(model, stage_dir / "adapter", base_model=src.base,
                 extra={"method": cfg.method("sft"), "seed": cfg.seed, "max_history": cfg.max_history,
                        "prompt_format": "candidates", "trained_prompt": cfg.prompt})  # fmt: skip
    counts.update(sft_epochs=training.epochs, sft_batch_size=training.batch_size,
                  sft_rows_seen=_rows_seen(len(examples), outcome.global_step, training))  # fmt: skip
    info = {"counts": counts, "train_steps": outcome.global_step, "train_loss": outcome.train_loss,
            "train_seconds": round(outcome.seconds, 1)}  # fmt: skip
    (stage_dir / "stage.json").write_text(json.dumps(info, indent=1))
    return StageResult(name="sft", directory=stage_dir, log_history=outcome.log_history, **info)


def run_preference_stage(
    cfg: DMPOFewShotConfig, loss: str, data: PreparedData, sft_dir: Path, out: Path, progress: bool
) -> StageResult:
    from recalign.lm.lora import attach_lora, load_lm, resolve_dtype, save_adapter
    from recalign.lm.reference import cached_reference_logprobs
    from recalign.training import train

    stage_dir = out / loss
    done = _done(stage_dir)
    if cfg.resume and done is not None:
        return StageResult(name=loss, directory=stage_dir, from_cache=True, **done)
    import torch

    model, tok, _ = load_lm(sft_dir, merge=True, dtype=resolve_dtype(cfg.dtype))  # the reference
    examples, counts = preference_rows(cfg, tok, data)
    if cfg.prompt == "pairwise":
        prompts, answers = _flat(examples)
    else:
        prompts, answers = [ex["prompt"] for ex in examples], [ex["answers"] for ex in examples]
    ref = cached_reference_logprobs(model, prompts, answers, stage_dir / "reference", batch_size=8)
    if cfg.prompt == "pairwise":
        k = cfg.negatives
        for i, ex in enumerate(examples):
            ex["ref"] = ref.logprobs[i * k : (i + 1) * k, :2].clone()
        objective = PairRankingObjective(loss, cfg.beta, cfg.nll_weight)
    else:
        from recalign.methods.align import PreferenceObjective

        for i, ex in enumerate(examples):
            ex["ref"] = ref.logprobs[i].clone()
        objective = PreferenceObjective(loss, cfg.beta, cfg.nll_weight)
    torch.manual_seed(cfg.pref_training.seed)
    model = attach_lora(model, cfg.lora)
    training = copy.deepcopy(cfg.pref_training)
    training.resume = cfg.resume
    training.progress = training.progress and progress
    if progress:
        print(f"dmpo few-shot: {loss} on {counts['n_pref_rows']} rows x K={cfg.negatives} "
              f"({counts['n_pref_prompts']} prompts), {training.epochs} epochs", flush=True)  # fmt: skip
    outcome = train(model, examples, objective, training, stage_dir / "checkpoints")
    save_adapter(model, stage_dir / "adapter", base_model=str(Path(sft_dir).resolve()),
                 extra={"method": cfg.method(loss), "seed": cfg.seed, "max_history": cfg.max_history,
                        "loss": loss, "prompt_format": "candidates", "trained_prompt": cfg.prompt})  # fmt: skip
    counts.update(pref_epochs=training.epochs, pref_batch_size=training.batch_size,
                  pref_rows_seen=_rows_seen(len(examples), outcome.global_step, training))  # fmt: skip
    info = {"counts": counts, "train_steps": outcome.global_step, "train_loss": outcome.train_loss,
            "train_seconds": round(outcome.seconds, 1)}  # fmt: skip
    (stage_dir / "stage.json").write_text(json.dumps(info, indent=1))
    return StageResult(name=loss, directory=stage_dir, log_history=outcome.log_history, **info)


# ---------------------------------------------------------------------- evaluation
def evaluate_stage(
    cfg: DMPOFewShotConfig,
    stage: StageResult,
    domains: dict[str, PreparedData],
    tests: dict[str, pd.DataFrame],
    *,
    extra: dict,
    command: str,
    sft_pairs: dict[str, np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[list[ResultRecord], dict[str, np.ndarray]]:
    """Every protocol x domain of one stage's model; returns its records and per-pair correctness."""
    from recalign.lm.lora import load_lm, resolve_dtype
    from recalign.methods.dmpo import evaluate_pairwise, paired_difference
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    model, tok, _ = load_lm(stage.directory / "adapter", merge=True, dtype=resolve_dtype(cfg.dtype))
    method = cfg.method(stage.name)
    records: list[ResultRecord] = []
    correct: dict[str, np.ndarray] = {}
    for dom in cfg.eval.domains:
        data, test = domains[dom], tests[dom]
        info = {**extra, "trained_prompt": cfg.prompt, "train_domain": "in-genre", "eval_domain": dom}
        if "pairwise" in cfg.eval.protocols:
            rec, res = evaluate_pairwise(
                model, tok, data.dataset, test, method=method, split_name=data.split.name, seed=cfg.seed,
                max_history=cfg.max_history, max_pairs=cfg.eval.max_pairs, batch_size=cfg.eval.batch_size,
                command=command, extra={**info, "eval_prompt": "pairwise"},
            )  # fmt: skip
            rec.protocol = f"pairwise/{dom}"
            correct[dom] = res.correct
            if sft_pairs is not None and dom in sft_pairs:
                rec.extra["vs_sft"] = paired_difference(res.correct, sft_pairs[dom])
            (stage.directory / f"pairs_{dom}.json").write_text(json.dumps(res.to_rows()))
            records.append(rec)
            if progress:
                print(f"{method} [{rec.protocol}] {rec.metrics}", flush=True)
        if "candidates" in cfg.eval.protocols:
            recs = evaluate_lm(
                model, tok, data.dataset, test, method=method, split_name=data.split.name,
                cfg=EvalConfig(n_test=len(test), protocols=["candidates"], batch_size=cfg.eval.batch_size),
                seed=cfg.seed, max_history=cfg.max_history, command=command, progress=progress,
                extra={**info, "eval_prompt": "candidates"},
            )  # fmt: skip
            for r in recs:
                r.protocol = f"candidates/{dom}"
            records.extend(recs)
    return records, correct


@dataclass
class DMPOFewShotResult:
    records: list[ResultRecord]
    stages: dict[str, StageResult]


def run_dmpo_fewshot(
    cfg: DMPOFewShotConfig,
    output_dir: str | Path,
    *,
    command: str | None = None,
    progress: bool = True,
    on_records: Callable[[list[ResultRecord]], None] | None = None,
) -> DMPOFewShotResult:
    """SFT, each preference loss, and the evaluation of every model (module docstring).

    Records go to ``<output_dir>/records.json`` (and to ``on_records``, if given) after every model, so
    an interrupted run keeps what it finished; rerun with ``resume: true`` to continue.
    """
    from recalign.config import save_config
    from recalign.rundir import open_output_dir

    cfg.validate()
    out = Path(output_dir)
    open_output_dir(out)
    save_config(cfg, out / "config.yaml")
    command = command if command is not None else current_command()
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    domains = domain_data(cfg)
    tests = {d: sample_examples(domains[d].split.stage("test"), cfg.eval.n_test, cfg.seed, stage="test")
             for d in cfg.eval.domains}  # fmt: skip
    genres = list(cfg.data.preprocess.item_genres_include)
    common = {
        "genres_in": genres,
        "domains": "in-genre: ML-100K items carrying any of genres_in; cross-genre: every other item, the same "
        "users (a genre shift, not a second data set)",
        "negatives": cfg.negatives,
        "max_history": cfg.max_history,
        "data_seconds": round(time.perf_counter() - t0, 1),
    }
    records: list[ResultRecord] = []

    def flush() -> None:
        write_records(out / "records.json", records)
        if on_records is not None:
            on_records(list(records))

    stages: dict[str, StageResult] = {}
    sft = run_sft_stage(cfg, domains["in-genre"], out, progress)
    stages["sft"] = sft
    sft_info = {**common, **sft.counts, "n_train": sft.counts["n_sft_rows"], "train_steps": sft.train_steps,
                "train_seconds": sft.train_seconds}  # fmt: skip
    recs, sft_correct = evaluate_stage(cfg, sft, domains, tests, extra=sft_info, command=command,
                                       progress=progress)  # fmt: skip
    records.extend(recs)
    flush()
    for loss in cfg.losses:
        st = run_preference_stage(cfg, loss, domains["in-genre"], sft.directory / "adapter", out, progress)
        stages[loss] = st
        info = {**common, **sft.counts, **st.counts, "loss": loss, "beta": cfg.beta,
                "nll_weight": cfg.nll_weight if loss == "dmpo" else 0.0,
                "n_train": sft.counts["n_sft_rows"] + st.counts["n_pref_rows"],
                "sft_train_steps": sft.train_steps, "train_steps": st.train_steps,
                "train_seconds": round(sft.train_seconds + st.train_seconds, 1)}  # fmt: skip
        recs, _ = evaluate_stage(cfg, st, domains, tests, extra=info, command=command, sft_pairs=sft_correct,
                                 progress=progress)  # fmt: skip
        records.extend(recs)
        flush()
    return DMPOFewShotResult(records=records, stages=stages)


__all__ = [
    "DEFAULT_GENRES",
    "DMPOEvalConfig",
    "DMPOFewShotConfig",
    "DMPOFewShotResult",
    "PairRankingObjective",
    "domain_data",
    "evaluate_stage",
    "preference_rows",
    "run_dmpo_fewshot",
    "sft_rows",
]
