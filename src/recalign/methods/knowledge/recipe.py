"""The recommendation-knowledge alignment recipe (Cao et al., NAACL Findings 2024), end to end.

1. Data: dataset + split through the shared data path (:func:`recalign.methods.load_data`).
2. Tasks: a mixture of auxiliary tasks (MIM, MLM, BPR) and recommendation tasks (retrieval, ranking,
   rating) written from the split's *training stage* (:mod:`.tasks`), in exact per-task counts for a
   fixed example budget (:mod:`.mixer`). The budget defaults to ``max_steps x global batch`` (per-device
   ``batch_size x grad_accum x processes``) so that every optimiser step sees fresh examples and two task
   mixtures trained for the same number of steps have seen the same number of examples: the comparison
   the paper's ablation needs.
3. Training: LoRA SFT through the project's one training path (:func:`recalign.training.train` with
   :class:`recalign.methods.sft.SFTObjective`: answer-token NLL, shared-prefix scoring), for decoder-only
   models and for encoder-decoder (FLAN-T5 family) models alike — the scorer dispatches on the family.
4. Evaluation (:mod:`.evaluation`): retrieval by full ranking of the catalogue, ranking on the split's
   shared candidates, rating RMSE/MAE, optionally trie-constrained generation, plus the shared next-item
   candidate protocol that every LM method reports (:func:`recalign.methods.zeroshot.evaluate_lm`).

Outputs in the run directory::

    config.yaml        resolved config
    adapter/           LoRA adapter (safetensors) + recalign_adapter.json naming the base model
    base/              only for in-process tiny models: their weights and tokenizer (the adapter's base)
    checkpoints/       training checkpoints (resumable with training.resume=true)
    metrics.json       {"metrics": {"retrieval/HR@10": ..., "rating/RMSE": ...}, "run": {...}}
    records.json       {"records": [...]} in the quality-results shape (extra.task names the task)

Models: ``"smollm2"`` (embedded), a local decoder-only or encoder-decoder model directory, or
``"tiny-llama"`` / ``"tiny-t5"``: a tiny randomly initialised model with a BPE tokenizer trained on the
run's own texts (tests and smoke runs).

Several processes (``accelerate launch``): every process builds the same mixture from the config (a pure
function of the seed and the *global* budget; checked to be identical on every process), the Trainer
gives each process its slice of every global batch, and only the main process writes files (config,
tiny base model, adapter, results) and evaluates. A tiny model is built and saved by the main process
and loaded from there by the others, so all start from the same weights and tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd

from recalign.config import Ge, cfg_field, check_constraints
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, write_records
from recalign.lm.lora import LoRAConfig
from recalign.methods.knowledge.templates import ALL_TASKS, AUX_TASKS, REC_TASKS
from recalign.methods.lm_recipe import LMRecipeConfig, LMRunResult, training_field, validate_lm_recipe
from recalign.methods.lm_runner import LMRecipe, RecipeRun, TrainingPlan, new_adapter, run_lm_recipe
from recalign.rundir import releasing
from recalign.training.config import TrainingConfig

EVAL_TASKS = ("retrieval", "ranking", "rating", "next_item", "generation")
TINY_MODELS = ("tiny-llama", "tiny-t5")
#: LoRA targets of T5-family attention (the decoder-only default names q_proj / v_proj).
T5_LORA_TARGETS = ["q", "v"]


@dataclass
class KnowledgeEvalConfig:
    """What is evaluated after training, and on how many users (full ranking is expensive)."""

    stage: Literal["test", "valid"] = cfg_field("test", "split stage evaluated")
    tasks: list[str] = cfg_field(
        ["retrieval", "ranking", "rating", "next_item"],
        "evaluations to run: retrieval (full catalogue), ranking (shared candidates), rating, "
        "next_item (the shared next-item candidate protocol), generation (greedy, grounded)",
    )
    n_users: int = cfg_field(200, "examples for ranking / next_item, sampled with the seed (<= 0: all)")
    n_users_rating: int = cfg_field(200, "examples for rating prediction (<= 0: all)")
    n_users_full: int = cfg_field(50, "examples for retrieval's full-catalogue ranking (<= 0: all)")
    retrieval_search: Literal["pruned", "exhaustive"] = cfg_field(
        "pruned",
        "full ranking by exact pruned trie search (ranks exact up to max(ks), much cheaper) or by scoring "
        "every title",
    )
    retrieval_beams: Annotated[int, Ge(0)] = cfg_field(
        30,
        "pruned search only: width of a title-constrained beam search whose titles are checked first; when "
        "max(ks) of them beat the target the search is skipped (ranks stay exact; 0 = no beam)",
    )
    n_users_generation: int = cfg_field(20, "examples for the generation evaluation (<= 0: all)")
    ks: list[int] = cfg_field([1, 5, 10, 20], "cut-offs K of HR/NDCG/MRR@K")
    chunk_size: Annotated[int, Ge(1)] = cfg_field(
        256, "answers per scoring pass (bounds memory for catalogue scoring)"
    )
    batch_size: Annotated[int, Ge(1)] = cfg_field(4, "examples per forward pass in the next_item protocol")
    max_new_tokens: Annotated[int, Ge(1)] = cfg_field(40, "generation length limit")

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in EVAL_TASKS]
        if bad:
            raise RecalignInputError(
                f"unknown evaluation '{bad[0]}' (choose from {', '.join(EVAL_TASKS)})", field="eval.tasks"
            )
        if not self.ks or min(self.ks) < 1:
            raise RecalignInputError("must be positive integers", field="eval.ks")
        check_constraints(self, "eval.")  # retrieval_beams >= 0; chunk_size, batch_size, max_new_tokens >= 1


@dataclass
class KnowledgeConfig(LMRecipeConfig):
    """``recalign knowledge``: multi-task SFT on recommendation-knowledge tasks, then per-task evaluation.

    ``model``, ``seed``, ``dtype``, ``threads`` and ``lora``: :class:`LMRecipeConfig`'s; ``data``,
    ``training`` and ``eval`` are redeclared (their defaults are knowledge's own).
    """

    # the configured split as it is: knowledge tasks need no LLaRA split
    data: DataPrepareConfig = cfg_field(
        help="dataset, split and candidates", default_factory=DataPrepareConfig
    )
    # SFT's optimiser defaults, checkpointing every 20 steps
    training: TrainingConfig = training_field(
        learning_rate=5e-4, max_steps=40, batch_size=8, warmup_steps=4, save_steps=20
    )
    # the knowledge tasks' own evaluation section
    eval: KnowledgeEvalConfig = cfg_field(  # type: ignore[assignment]
        help="evaluation after training", default_factory=KnowledgeEvalConfig
    )
    method: str = cfg_field(
        "", "method name in records; empty: derived from the tasks (knowledge-rec+aux, ...)"
    )
    tasks: list[str] = cfg_field(list(ALL_TASKS), f"training tasks, from {', '.join(ALL_TASKS)}")
    ratios: list[float] = cfg_field([1.0] * len(ALL_TASKS), "mixing ratio of each task (same order as tasks)")
    n_examples: Annotated[int, Ge(0)] = cfg_field(
        0,
        "training examples in the mixture; 0: max_steps x batch_size x grad_accum x processes (one pass "
        "at the global batch)",
    )
    history_len: Annotated[int, Ge(1)] = cfg_field(10, "history items shown in task prompts (most recent)")
    train_candidates: int = cfg_field(
        0,
        "candidates listed in training ranking prompts (0: the split's, which evaluation always uses; fewer "
        "makes prompts cheaper but trains a shorter list than the one evaluated)",
    )
    mlm_rate: float = cfg_field(0.15, "share of maskable title words hidden in MLM prompts")
    rec_form: Literal["informative", "ids"] = cfg_field(
        "informative",
        "recommendation-task samples: informative (Cao et al.: the user as a history of titles, no user id) "
        "or ids (the P5-style form it replaces: user_<id>, item_<id>; evaluated in the same form)",
    )
    scoring_impl: str = cfg_field("packed", "decoder-only shared-prefix scoring in training: packed or kv")
    tiny_hidden: int = cfg_field(64, "hidden size of tiny-llama / tiny-t5")

    def validate(self) -> None:
        from recalign.methods.knowledge.mixer import allocate

        allocate(0, self.tasks, self.ratios)  # checks names, duplicates, counts and ratio values
        check_constraints(self, nested=False)  # n_examples, threads >= 0; history_len >= 1 (nested: below)
        if self.train_candidates < 0 or self.train_candidates == 1:
            raise RecalignInputError("must be 0 or >= 2", field="train_candidates")
        if not 0 < self.mlm_rate <= 1:
            raise RecalignInputError("must be in (0, 1]", field="mlm_rate")
        if self.scoring_impl not in ("packed", "kv"):
            raise RecalignInputError(f"must be packed or kv, got {self.scoring_impl!r}", field="scoring_impl")
        validate_lm_recipe(self, "knowledge alignment trains an adapter")

    def budget(self, world_size: int | None = None) -> int:
        """Examples in the mixture: ``n_examples``, or one pass of ``max_steps`` at the global batch
        (``batch_size`` is per process, so the global batch counts the launched processes)."""
        if self.n_examples > 0:
            return self.n_examples
        if self.training.max_steps <= 0:
            raise RecalignInputError("set n_examples, or training.max_steps to derive it", field="n_examples")
        if world_size is None:
            from recalign.training import distributed

            world_size = distributed.world_size()
        t = self.training
        return t.max_steps * t.batch_size * t.grad_accum * world_size

    def method_name(self) -> str:
        """``knowledge-rec`` (recommendation tasks only), ``knowledge-rec+aux`` (all three auxiliary
        tasks), ``knowledge-rec+mim`` / ``knowledge-rec+mim+bpr`` (a subset), ``knowledge-aux`` (no
        recommendation task)."""
        if self.method:
            return self.method
        active = [t for t, r in zip(self.tasks, self.ratios) if r > 0]
        aux = [t for t in AUX_TASKS if t in active]
        rec = [t for t in REC_TASKS if t in active]
        if not rec:
            return "knowledge-aux"
        if not aux:
            return "knowledge-rec"
        if len(aux) == len(AUX_TASKS):
            return "knowledge-rec+aux"
        return "knowledge-rec+" + "+".join(aux)


@dataclass
class KnowledgeResult(LMRunResult):
    """What :func:`run_knowledge` returns: the run, and the mixture's examples per task."""

    task_counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- models
def _is_seq2seq_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text(encoding="utf-8")).get("is_encoder_decoder"))


def _tiny_model(kind: str, texts: list[str], hidden: int, out: Path, seed: int):
    """A tiny model + tokenizer trained on the run's texts, saved under ``out/base`` as the adapter's base."""
    from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
    from recalign.lm.seq2seq import build_tiny_t5

    tok = train_bpe_tokenizer(texts, vocab_size=600)
    if kind == "tiny-t5":
        model = build_tiny_t5(tok, d_model=hidden, d_ff=2 * hidden, seed=seed)
    else:
        model = build_tiny_llama(tok, hidden_size=hidden, seed=seed)
    base_dir = out / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    return model, tok, str(base_dir)


def load_base(name: str, texts: list[str], hidden: int, out: Path, seed: int, *, dtype: str = "float32"):
    """(model, tokenizer, base name recorded with the adapter) for any ``model`` value of the config.

    A tiny model is built and saved by the main process; in a multi-process run the others wait and
    load the saved copy (one writer, and every process holds the same weights and tokenizer).
    """
    from recalign.lm.lora import load_lm, resolve_dtype
    from recalign.training import distributed

    if name in TINY_MODELS:
        with distributed.main_first():
            if distributed.is_main():
                return _tiny_model(name, texts, hidden, out, seed)
        return load_base(str(out / "base"), texts, hidden, out, seed, dtype="float32")
    if _is_seq2seq_dir(name):
        from recalign.lm.seq2seq import load_seq2seq

        model, tok = load_seq2seq(name, dtype=resolve_dtype(dtype))
        return model, tok, name
    model, tok, src = load_lm(name, merge=False, trainable=True, dtype=resolve_dtype(dtype))
    if src.adapter is not None:
        raise RecalignInputError("give a base model, not an adapter: knowledge training starts a new adapter")
    return model, tok, src.base


def _lora_for(model, cfg: LoRAConfig) -> LoRAConfig:
    """T5-family attention projections are called q/k/v/o: map the decoder-only default onto them."""
    from recalign.lm.seq2seq import is_seq2seq

    if is_seq2seq(model) and list(cfg.target_modules) == ["q_proj", "v_proj"]:
        return LoRAConfig(**{**cfg.__dict__, "target_modules": list(T5_LORA_TARGETS)})
    return cfg


SCORED_TASKS = ("retrieval", "ranking", "rating")


def evaluate_scored_task(scorer, tasks, task: str, stage, e: KnowledgeEvalConfig, seed: int):
    """One of :data:`SCORED_TASKS` on its seeded sample of ``stage`` (sizes and search settings from
    ``e``): the evaluation every knowledge variant and the untrained baseline share."""
    from recalign.methods import sample_examples
    from recalign.methods.knowledge import evaluation as ev

    n = {"retrieval": e.n_users_full, "ranking": e.n_users, "rating": e.n_users_rating}[task]
    rows = sample_examples(stage, n, seed, stage=e.stage)
    if task == "retrieval":
        exhaustive = e.retrieval_search == "exhaustive"
        return ev.evaluate_retrieval(
            scorer, tasks, rows, e.ks, exhaustive=exhaustive, beams=e.retrieval_beams
        )
    if task == "ranking":
        return ev.evaluate_ranking(scorer, tasks, rows, e.ks)
    return ev.evaluate_rating(scorer, tasks, rows)


# ---------------------------------------------------------------------- the recipe
class KnowledgeRecipe(LMRecipe):
    """:func:`run_knowledge`'s own steps (:func:`~recalign.methods.lm_recipe.run_lm_recipe` runs the rest):
    the task mixture, any model family, and the per-task evaluation."""

    absent_run_keys = ("resumed_from", "finished")

    def prepare(self, run: RecipeRun) -> TrainingPlan:
        from recalign.lm.seq2seq import text_encoders
        from recalign.methods.knowledge.mixer import allocate, mix
        from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions
        from recalign.methods.sft import SFTObjective
        from recalign.training import distributed

        cfg = self.cfg
        dataset, split = run.data.dataset, run.data.split
        opts = dict(history_len=cfg.history_len, mlm_rate=cfg.mlm_rate, seed=cfg.seed, rec_form=cfg.rec_form)
        self.train_tasks = KnowledgeTasks(
            dataset, split, TaskOptions(n_candidates=cfg.train_candidates or None, **opts)
        )
        self.eval_tasks = KnowledgeTasks(dataset, split, TaskOptions(**opts))  # always the split's candidates
        budget = cfg.budget()
        self.counts = allocate(budget, cfg.tasks, cfg.ratios)
        mixture = mix(self.train_tasks, cfg.tasks, cfg.ratios, budget, seed=cfg.seed)
        # one mixture for the whole run: each process trains on its slice of every global batch of it
        distributed.check_same(
            distributed.digest([(e.prompt, e.answer) for e in mixture]), "the task mixture"
        )

        texts = [e.prompt + " " + e.answer for e in mixture] + self.train_tasks.titles
        model, tok, base_name = load_base(
            cfg.model, texts, cfg.tiny_hidden, run.out, cfg.seed, dtype=cfg.dtype
        )
        dtype = next(model.parameters()).dtype  # tiny models are float32 whatever cfg.dtype says
        model = new_adapter(model, _lora_for(model, cfg.lora), cfg.training.seed)
        enc_prompt, enc_answer = text_encoders(model, tok)
        examples = [{"prompt": enc_prompt(e.prompt), "answers": [enc_answer(e.answer)]} for e in mixture]
        return TrainingPlan(
            model, tok, examples, SFTObjective(cfg.scoring_impl), base_model=base_name, dtype=dtype
        )

    def describe(self, plan: TrainingPlan, trainable: int, total: int) -> str:
        return (
            f"knowledge [{self.method}]: {len(plan.examples)} examples {self.counts}, model {self.cfg.model} "
            f"({trainable:,} trainable of {total:,} parameters)"
        )

    def adapter_extra(self) -> dict:
        return {"tasks": self.cfg.tasks, "ratios": self.cfg.ratios}

    def run_info(self, run: RecipeRun, outcome) -> dict:
        return {"model": self.cfg.model, "tasks": dict(zip(self.cfg.tasks, self.cfg.ratios)),
                "task_counts": self.counts}  # fmt: skip

    def evaluate(self, plan: TrainingPlan, run: RecipeRun, outcome, test_examples=None):
        """Every task of ``eval.tasks`` on the merged model, written to ``records.json``; no run fields."""
        from recalign.methods import sample_examples
        from recalign.methods.knowledge import evaluation as ev

        cfg, method, progress = self.cfg, self.method, run.progress
        dataset, split = run.data.dataset, run.data.split
        model, tok = plan.model.merge_and_unload(), plan.tokenizer
        model.eval()
        e = cfg.eval
        stage = split.stage(e.stage)
        scorer = ev.TaskScorer(model, tok, chunk_size=e.chunk_size)
        base_record = dict(dataset=dataset.name, split=split.name, method=method, seed=cfg.seed,
                           command=run.command)  # fmt: skip
        info = {
            "model": cfg.model,
            "train_steps": outcome.global_step,
            "n_train": len(plan.examples),
            "task_counts": self.counts,
            # the ranking task's prompt shape in training and at evaluation (the same by default)
            "train_candidates": self.train_tasks.n_candidates,
            "eval_candidates": self.eval_tasks.n_candidates,
            "history_len": cfg.history_len,
            "rec_form": cfg.rec_form,
            "training_seed": cfg.training.seed,
        }
        records: list[ResultRecord] = []
        flat: dict[str, float] = {}

        def add(task: str, protocol: str, metrics: dict, n: int, seconds: float) -> None:
            records.append(
                ResultRecord(
                    protocol=protocol,
                    metrics={k: float(v) for k, v in metrics.items()},
                    n_examples=n,
                    seconds=round(seconds, 2),
                    extra={"task": task, **info},
                    **base_record,
                )
            )
            flat.update({f"{task}/{k}": float(v) for k, v in metrics.items()})
            if progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in list(metrics.items())[:6])
                print(f"{method} [{task}] n={n} {shown}", flush=True)

        def rows(n: int) -> pd.DataFrame:
            return sample_examples(stage, n, cfg.seed, stage=e.stage)

        for task in e.tasks:
            t1 = time.perf_counter()
            if task == "rating" and not dataset.has_ratings:
                continue
            if task in SCORED_TASKS:
                r = evaluate_scored_task(scorer, self.eval_tasks, task, stage, e, cfg.seed)
            elif task == "generation":
                r = ev.evaluate_generation(
                    model, tok, self.eval_tasks, rows(e.n_users_generation), max_new_tokens=e.max_new_tokens
                )
            else:  # next_item: the protocol shared by every LM method
                from recalign.evaluation.protocols import evaluate_candidates
                from recalign.lm.recommender import LMRecommender

                ex = rows(e.n_users)
                rec = LMRecommender(model, tok, dataset, seed=cfg.seed, name=method, max_history=cfg.history_len,
                                    batch_size=e.batch_size, progress=False)  # fmt: skip
                metrics = evaluate_candidates(rec, ex, ks=e.ks, batch_size=max(len(ex), 1))
                add("next_item", "candidates", metrics, len(ex), time.perf_counter() - t1)
                continue
            add(task, r.protocol, r.metrics, r.n_examples, time.perf_counter() - t1)

        write_records(run.out / "records.json", records)
        return records, flat, {}

    def result(self, out: Path, outcome, adapter_dir: Path, records: list[ResultRecord], metrics: dict):
        return KnowledgeResult.of(out, outcome, adapter_dir, records, metrics, task_counts=self.counts)

    def other_process(self, out: Path, outcome):
        # another process of a distributed run: the main process saves, evaluates and writes results
        return self.result(out, outcome, out / "adapter", [], {"metrics": {}, "run": {}})


@releasing  # the output directory's lock (recalign.rundir) is released on return
def run_knowledge(
    cfg: KnowledgeConfig,
    output_dir: str | Path,
    *,
    data=None,
    command: str | None = None,
    progress: bool = True,
) -> KnowledgeResult:
    """Generate the task mixture, SFT a LoRA adapter on it, evaluate every requested task."""
    return run_lm_recipe(KnowledgeRecipe(cfg), output_dir, data=data, command=command, progress=progress)
