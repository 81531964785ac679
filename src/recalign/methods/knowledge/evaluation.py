"""Per-task evaluation of a knowledge-aligned LM, for decoder-only and encoder-decoder models alike.

Every recommendation task is evaluated by *scoring* answers (log-probability of each possible answer
given the prompt, shared-prefix), which gives every item a score and so the ranking metrics of
:mod:`recalign.evaluation.metrics`:

- **retrieval** (protocol ``full``): the retrieval prompt (no candidates), every catalogue title scored as
  the answer, items of the history excluded, HR/NDCG/MRR@K of the target (RecBole's NDCG). This costs
  about ``n_items x title length`` answer tokens per user, hence ``n_users`` sampling for real models.
- **ranking** (protocol ``candidates``): the ranking prompt listing the split's shared candidates, each
  candidate title scored as the answer; HR/NDCG/MRR@K and AUC.
- **rating** (protocol ``rating``): the five answers ``"1"``..``"5"`` scored; their softmax is the
  predicted distribution. RMSE/MAE of its expected value (``RMSE``, ``MAE``) and of its argmax
  (``RMSE_argmax``, ``MAE_argmax``), plus exact-digit ``Accuracy``.
- **generation** (protocol ``generation``): greedy decoding constrained to the title trie (always a
  catalogue item: ``HR@1``), and unconstrained greedy decoding grounded by nearest title
  (``HR@1_nearest`` over all examples, ``ValidRatio`` = share grounded to some item).

The shared next-item candidate protocol (the prompt every LM method is evaluated with) is
:class:`recalign.lm.recommender.LMRecommender` + :func:`recalign.evaluation.protocols.evaluate_candidates`;
the recipe reports it next to these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from recalign.evaluation.metrics import mae, rmse, single_target_metrics, target_ranks
from recalign.evaluation.protocols import full_ranks
from recalign.lm.scoring import answer_logprobs
from recalign.lm.seq2seq import answer_stop_ids, text_encoders
from recalign.methods.knowledge.grounding import (
    TitleMatcher,
    TitleTrie,
    constrained_generate,
    trie_beam_search,
)
from recalign.methods.knowledge.tasks import KnowledgeTasks

RATING_ANSWERS = ("1", "2", "3", "4", "5")


class TaskScorer:
    """Scores text answers against text prompts with the model's family rules (tokenisation, scoring).

    Answer encodings are cached (the catalogue's titles are encoded once). ``chunk_size`` bounds how many
    answers share one pass (memory); ``causal_impl`` picks the decoder-only shared-prefix variant
    (``"kv"`` reuses one prompt cache across chunks, the better choice for whole-catalogue scoring).
    """

    def __init__(self, model, tokenizer, *, chunk_size: int = 256, causal_impl: str = "kv") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.causal_impl = causal_impl
        self._enc_prompt, self._enc_answer = text_encoders(model, tokenizer)
        self._answers: dict[str, list[int]] = {}

    def encode_prompt(self, text: str) -> list[int]:
        return self._enc_prompt(text)

    def encode_answer(self, text: str) -> list[int]:
        ids = self._answers.get(text)
        if ids is None:
            ids = self._answers[text] = self._enc_answer(text)
        return ids

    def score(self, prompts: Sequence[str], answers: Sequence[Sequence[str]]) -> np.ndarray:
        """``[len(prompts), max answers]`` summed answer log-probs (``-inf`` where padded)."""
        p_ids = [self.encode_prompt(p) for p in prompts]
        a_ids = [[self.encode_answer(a) for a in ans] for ans in answers]
        return self.score_ids(p_ids, a_ids)

    def score_ids(
        self, p_ids: Sequence[Sequence[int]], a_ids: Sequence[Sequence[Sequence[int]]]
    ) -> np.ndarray:
        """:meth:`score` on token ids (answers may be partial titles: prefixes of answer sequences)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                # answer_logprobs serves both families (the encoder pass is a T5's shared prefix)
                s = answer_logprobs(
                    self.model, p_ids, a_ids, impl=self.causal_impl, chunk_size=self.chunk_size
                )
        finally:
            if was_training:
                self.model.train()
        return s.sum.float().cpu().numpy().astype(np.float64)


@dataclass
class TaskResult:
    """Metrics of one task plus per-example details (for records.json and debugging)."""

    task: str
    protocol: str
    metrics: dict[str, float]
    n_examples: int
    details: list[dict] = field(default_factory=list)


def sample_rows(examples: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` rows, a seeded sample in original order (all rows when ``n`` is None or 0)."""
    if not n or n >= len(examples):
        return examples.reset_index(drop=True)
    idx = np.sort(np.random.default_rng([seed, 4242]).choice(len(examples), size=n, replace=False))
    return examples.iloc[idx].reset_index(drop=True)


def _ks(ks: Sequence[int], limit: int) -> list[int]:
    return [k for k in ks if k <= limit]


def catalogue_rank(
    scorer: TaskScorer,
    prompt_ids: Sequence[int],
    trie: TitleTrie,
    target: int,
    target_ids: Sequence[int],
    exclude: set[int],
    k_max: int,
    *,
    nodes_per_pass: int = 32,
    margin: float = 1e-3,
    seeds: Mapping[int, Sequence[int]] | None = None,
    search: bool = True,
    scored: dict[int, float] | None = None,
) -> tuple[int | None, int]:
    """Exact rank of ``target`` among all catalogue titles when it is at most ``k_max``, without scoring
    the whole catalogue; ``k_max + 1`` means "below ``k_max``".

    Why it is exact: a title's score is the sum of its tokens' log-probs, each ``<= 0``, so the score of
    a title prefix bounds every title below it in the trie. Best-first search from the root expands
    prefixes scoring at least the target's score ``s_t`` (minus a float ``margin``) and counts complete
    titles scoring ``>= s_t`` (ties against the target, as :func:`~recalign.evaluation.metrics.target_ranks`;
    items in ``exclude`` -- the history -- and the target itself are not counted). It stops when the
    frontier falls below ``s_t`` (rank = count + 1) or ``k_max`` titles are found (rank > ``k_max``).
    A child's score is ``log p(prefix + token)``, scored as a partial answer with the shared-prefix
    scorer, so the numbers are those of full scoring. Typically a few thousand answer tokens instead of
    the catalogue's ~20k (ML-100K, SmolLM2 tokenizer).

    ``seeds`` short-cuts the common case of a target far down the list: titles already known to score
    well (a constrained beam search's top titles, see :func:`beam_seeds`) are scored first, and when
    ``k_max`` of them beat the target its rank is proven to be beyond ``k_max`` without any search. Seeds
    that beat the target but are fewer than ``k_max`` are counted once and skipped when the search
    reaches them, so the result is the same with or without seeds (tested).

    Args:
        target_ids: the target's answer ids (its path in ``trie``).
        seeds: item -> answer ids of titles to check before searching.
        search: ``False`` returns ``(None, cost)`` instead of searching when the seeds prove nothing.
        scored: item -> full-title score already computed for this prompt, filled in by the call. A
            caller that tries a narrow beam's seeds, then a wider beam's, then the search (as
            :func:`evaluate_retrieval` does) passes one dict to every call, so the target and the seeds
            are scored once per prompt, not once per call.

    Returns:
        ``(rank, answer tokens scored)``.
    """
    import heapq

    seeds = {j: list(a) for j, a in (seeds or {}).items() if j != target and j not in exclude}
    items_s = list(seeds)
    known = {} if scored is None else scored
    ids_of = {**seeds, target: list(target_ids)}
    need = [j for j in [target, *items_s] if j not in known]
    cost = sum(len(ids_of[j]) for j in need)
    if need:  # the target and the seeds in one pass: the ~280-token retrieval prompt runs once for both
        for j, v in zip(need, scorer.score_ids([prompt_ids], [[ids_of[j] for j in need]])[0]):
            known[j] = float(v)
    s_t = known[target]
    if np.isnan(s_t) or s_t == float("inf"):
        # NaN or +inf target score (a diverged model): it ranks last, never first (the project's rule,
        # README "Metric conventions"); `v >= NaN` is always False and would have counted nothing above it
        return k_max + 1, cost
    bound = s_t - margin
    counted: set[int] = set()
    if seeds:
        sc = _nan_high([known[j] for j in items_s])
        counted = {j for j, v in zip(items_s, sc) if v >= s_t}
        if len(counted) >= k_max:
            return k_max + 1, cost
    if not search:
        return None, cost
    count = len(counted)
    skip = set(exclude) | counted  # never counted again (history, or already counted as a seed)
    heap: list[tuple[float, tuple[int, ...]]] = [(-0.0, ())]
    while heap and count < k_max:
        batch = []
        while heap and len(batch) < nodes_per_pass and -heap[0][0] >= bound:
            batch.append(heapq.heappop(heap)[1])
        if not batch:
            break
        answers = [list(prefix) + [tok] for prefix in batch for tok in trie.allowed(prefix)]
        cost += sum(len(a) for a in answers)
        scores = _nan_high(scorer.score_ids([prompt_ids], [answers])[0])
        for ans, sc in zip(answers, scores):
            if sc < bound:
                continue
            items = trie.items(ans)
            if items:  # a complete title (answer sequences end with the end-of-answer token)
                if sc >= s_t:
                    count += sum(1 for it in items if it != target and it not in skip)
            else:
                heapq.heappush(heap, (-float(sc), tuple(ans)))
    return (count + 1 if count < k_max else k_max + 1), cost


def _nan_high(scores) -> np.ndarray:
    """NaN competitor scores as +inf: a NaN title counts against the target (like a tie) and a NaN
    prefix is explored first, so a model returning NaN for other items never gains from it."""
    a = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(a), np.inf, a)


def beam_seeds(
    scorer: TaskScorer, prompt_ids: Sequence[int], trie: TitleTrie, stop_ids: Sequence[int], beams: int
) -> dict[int, list[int]]:
    """Items (-> answer ids) of the top titles of a ``beams``-wide title-constrained beam search.

    Decoder-only models use :func:`~recalign.methods.knowledge.grounding.trie_beam_search` (one prompt
    pass, shared cache); encoder-decoders transformers' beam search, with finished titles ranked by
    summed log-prob (``length_penalty=0``: with the default length normalisation it returns long titles
    whose summed score is low, which rarely beat the target and so rarely spare the search).
    """
    from recalign.lm.seq2seq import is_seq2seq

    was_training = scorer.model.training
    scorer.model.eval()
    try:
        if is_seq2seq(scorer.model):
            found = [
                j
                for items in constrained_generate(
                    scorer.model,
                    prompt_ids,
                    trie,
                    stop_ids=stop_ids,
                    num_beams=beams,
                    num_return=beams,
                    length_penalty=0.0,
                )
                for j in items
            ]
        else:
            found = list(trie_beam_search(scorer.model, prompt_ids, trie, beams=beams))
    finally:
        if was_training:
            scorer.model.train()
    return {int(j): list(trie.sequences[j]) for j in found}


def evaluate_retrieval(
    scorer: TaskScorer,
    tasks: KnowledgeTasks,
    examples: pd.DataFrame,
    ks: Sequence[int] = (1, 5, 10, 20),
    *,
    exhaustive: bool = True,
    beams: int = 0,
) -> TaskResult:
    """Full ranking of the catalogue by answer log-prob under the retrieval prompt (history excluded).

    ``exhaustive=True`` scores every title (the reference; cheap for tiny models); ``False`` uses the
    exact pruned search :func:`catalogue_rank`, which yields the same metrics at every K <= max(ks) for a
    fraction of the cost (ranks beyond max(ks) are only known to be beyond it, which no @K metric needs).
    ``beams > 0`` (pruned search only) first runs a title-constrained beam search of that width (then,
    if its titles prove nothing, one four times as wide -- users with long histories see many of the
    beam's titles excluded) and hands the titles to the search as seeds: the ranks stay exact, and for
    a target far down the list (most users, for any model not yet good at retrieval) the search is
    skipped -- on SmolLM2 a few seconds instead of about a minute per user.
    """
    titles = tasks.answer_names  # titles, or item ids in the ``ids`` form (tasks.TaskOptions.rec_form)
    ks = _ks(ks, len(titles))
    ranks, details = [], []
    trie = None if exhaustive else TitleTrie.from_titles(titles, scorer.encode_answer)
    stop = answer_stop_ids(scorer.model, scorer.tokenizer) if beams and not exhaustive else None
    for i in range(len(examples)):
        row = examples.iloc[i]
        ex = tasks.example("retrieval", row)
        if exhaustive:
            scores = scorer.score([ex.prompt], [titles])
            r, cost = (
                int(full_ranks(scores, examples.iloc[i : i + 1])[0]),
                sum(len(scorer.encode_answer(t)) for t in titles),
            )
        else:
            exclude = {int(h) for h in row["history"]} - {int(row["target"])}
            t = int(row["target"])
            p_ids = scorer.encode_prompt(ex.prompt)
            t_ids = scorer.encode_answer(titles[t])
            r, cost, seeds, scored = None, 0, None, {}
            for width in (beams, 4 * beams) if stop is not None else ():
                seeds = beam_seeds(scorer, p_ids, trie, stop, width)
                r, c = catalogue_rank(
                    scorer, p_ids, trie, t, t_ids, exclude, max(ks), seeds=seeds, search=False, scored=scored
                )
                cost += c
                if r is not None:
                    break
            if r is None:
                r, c = catalogue_rank(
                    scorer, p_ids, trie, t, t_ids, exclude, max(ks), seeds=seeds, scored=scored
                )
                cost += c
        ranks.append(r)
        details.append(
            {"user": int(row["user"]), "target": int(row["target"]), "rank": r, "answer_tokens": cost}
        )
    metrics = single_target_metrics(np.asarray(ranks, dtype=np.int64), ks)
    return TaskResult("retrieval", "full", metrics, len(examples), details)


def evaluate_ranking(
    scorer: TaskScorer, tasks: KnowledgeTasks, examples: pd.DataFrame, ks: Sequence[int] = (1, 5, 10, 20)
) -> TaskResult:
    """The ranking prompt's candidates (the split's shared ones) ranked by answer log-prob."""
    ranks, details = [], []
    n_c = tasks.n_candidates
    for i in range(len(examples)):
        ex = tasks.example("ranking", examples.iloc[i])
        s = scorer.score([ex.prompt], [[tasks.answer_names[c] for c in ex.candidates]])[0]
        r = int(target_ranks(s[None, :], np.array([ex.candidates.index(ex.target)]))[0])
        ranks.append(r)
        details.append({"user": ex.user, "target": ex.target, "rank": r})
    metrics = single_target_metrics(np.asarray(ranks), _ks(ks, n_c), n_candidates=n_c)
    return TaskResult("ranking", "candidates", metrics, len(examples), details)


def evaluate_rating(scorer: TaskScorer, tasks: KnowledgeTasks, examples: pd.DataFrame) -> TaskResult:
    """Rating prediction from the scored distribution over the five digit answers."""
    pool = examples
    true, expected, argmax, details = [], [], [], []
    stars = np.arange(1, 6, dtype=np.float64)
    for i in range(len(pool)):
        ex = tasks.example("rating", pool.iloc[i])
        if ex.rating is None or np.isnan(ex.rating):
            continue
        s = scorer.score([ex.prompt], [list(RATING_ANSWERS)])[0]
        p = np.exp(s - s.max())
        p /= p.sum()
        true.append(float(ex.rating))
        expected.append(float((p * stars).sum()))
        argmax.append(float(stars[int(np.argmax(p))]))
        details.append({"user": ex.user, "target": ex.target, "rating": ex.rating, "expected": expected[-1]})
    t = np.asarray(true)
    metrics = (
        {
            "RMSE": rmse(expected, t),
            "MAE": mae(expected, t),
            "RMSE_argmax": rmse(argmax, t),
            "MAE_argmax": mae(argmax, t),
            "Accuracy": float((np.asarray(argmax) == np.floor(t + 0.5)).mean()),
        }
        if len(t)
        else {}
    )
    return TaskResult("rating", "rating", metrics, len(t), details)


def evaluate_generation(
    model,
    tokenizer,
    tasks: KnowledgeTasks,
    examples: pd.DataFrame,
    *,
    max_new_tokens: int = 40,
) -> TaskResult:
    """Greedy retrieval answers: constrained to the title trie, and free text grounded by nearest title."""
    enc_prompt, enc_answer = text_encoders(model, tokenizer)
    trie = TitleTrie.from_titles(tasks.answer_names, enc_answer)
    matcher = TitleMatcher(tasks.answer_names)
    stop = answer_stop_ids(model, tokenizer)
    from recalign.lm.modules import is_seq2seq, unwrap_peft

    base = unwrap_peft(model)
    offset_seq2seq = is_seq2seq(model)
    hits_c, hits_n, valid, details = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(len(examples)):
            ex = tasks.example("retrieval", examples.iloc[i])
            ids = enc_prompt(ex.prompt)
            got = constrained_generate(model, ids, trie, stop_ids=stop, max_new_tokens=max_new_tokens)
            top = got[0][0] if got else None
            with torch.inference_mode():
                inp = torch.tensor([ids], device=next(base.parameters()).device)
                out = model.generate(
                    input_ids=inp,
                    attention_mask=torch.ones_like(inp),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=base.config.pad_token_id
                    if base.config.pad_token_id is not None
                    else stop[0],
                )
            new = out[0].tolist()[(1 if offset_seq2seq else len(ids)) :]
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            m = matcher.match(text)
            hits_c.append(float(top == ex.target))
            hits_n.append(float(m.item == ex.target))
            valid.append(float(m.item is not None))
            details.append(
                {"user": ex.user, "target": ex.target, "constrained": top, "text": text, "grounded": m.item}
            )
    finally:
        if was_training:
            model.train()
    metrics = (
        {
            "HR@1": float(np.mean(hits_c)),
            "HR@1_nearest": float(np.mean(hits_n)),
            "ValidRatio": float(np.mean(valid)),
        }
        if len(examples)
        else {}
    )
    return TaskResult("generation", "generation", metrics, len(examples), details)


# ---------------------------------------------------------------------- rating references
def known_ratings(tasks: KnowledgeTasks, stage: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, rating) of every interaction known when ``stage`` is predicted: for a user with a row
    in ``stage``, every position before it (what the LM's rating prompt may show as history, e.g. the
    validation item for ``loo``'s test rows); for other users, their train-stage positions. No evaluated
    target is ever included."""
    seqs = tasks.dataset.sequences()
    limit = tasks.stage("train").groupby("user")["position"].max() + 1  # positions < limit are known
    evaluated = tasks.stage(stage).groupby("user")["position"].min()
    limit = limit.combine(evaluated, lambda a, b: b if not np.isnan(b) else a, fill_value=np.nan)
    users, items, ratings = [], [], []
    for u, n in limit.items():
        for p in range(int(n)):
            r = tasks.rating_at(int(u), p)
            if not np.isnan(r):
                users.append(int(u))
                items.append(int(seqs[int(u)][p]))
                ratings.append(r)
    return np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(ratings, np.float64)


@dataclass
class BiasBaseline:
    """Global mean and damped user / item biases (Koren's baseline predictor):
    ``b_i = Σ(r - μ) / (reg_item + n_i)``, then ``b_u = Σ(r - μ - b_i) / (reg_user + n_u)``; predictions
    ``μ + b_u + b_i`` clipped to [1, 5]. Unknown users or items get bias 0."""

    mu: float
    user_bias: dict[int, float]
    item_bias: dict[int, float]

    @classmethod
    def fit(cls, users, items, ratings, reg_user: float = 10.0, reg_item: float = 10.0) -> BiasBaseline:
        users, items, ratings = np.asarray(users), np.asarray(items), np.asarray(ratings, dtype=float)
        if len(ratings) == 0:
            raise ValueError("no training ratings")
        mu = float(ratings.mean())
        df = pd.DataFrame({"u": users, "i": items, "r": ratings - mu})
        gi = df.groupby("i")["r"].agg(["sum", "count"])
        bi = (gi["sum"] / (reg_item + gi["count"])).to_dict()
        df["r2"] = df["r"] - df["i"].map(bi)
        gu = df.groupby("u")["r2"].agg(["sum", "count"])
        bu = (gu["sum"] / (reg_user + gu["count"])).to_dict()
        return cls(mu=mu, user_bias={int(k): float(v) for k, v in bu.items()},
                   item_bias={int(k): float(v) for k, v in bi.items()})  # fmt: skip

    def predict(self, users, items) -> np.ndarray:
        p = [
            self.mu + self.user_bias.get(int(u), 0.0) + self.item_bias.get(int(i), 0.0)
            for u, i in zip(users, items)
        ]
        return np.clip(np.asarray(p, dtype=float), 1.0, 5.0)


def evaluate_rating_references(
    tasks: KnowledgeTasks, examples: pd.DataFrame, stage: str = "test"
) -> dict[str, TaskResult]:
    """Non-LM rating references on exactly the rows the LM's rating task is evaluated on
    (``examples``, rows of ``stage``): ``rating-global-mean`` (the known ratings' mean) and
    ``rating-bias`` (:class:`BiasBaseline`), both fitted on :func:`known_ratings`; RMSE / MAE like
    :func:`evaluate_rating` (whose expected-value prediction they compare with)."""
    users, items, ratings = known_ratings(tasks, stage)
    base = BiasBaseline.fit(users, items, ratings)
    rows = [
        (int(u), int(t), tasks.rating_at(int(u), int(p)))
        for u, p, t in zip(examples["user"], examples["position"], examples["target"])
    ]
    rows = [r for r in rows if not np.isnan(r[2])]
    t = np.asarray([r[2] for r in rows], dtype=float)
    preds = {
        "rating-global-mean": np.full(len(t), base.mu),
        "rating-bias": base.predict([r[0] for r in rows], [r[1] for r in rows]),
    }
    out = {}
    for name, pred in preds.items():
        metrics = {"RMSE": rmse(pred, t), "MAE": mae(pred, t)} if len(t) else {}
        out[name] = TaskResult("rating", "rating", metrics, len(t), [{"n_train_ratings": len(ratings)}])
    return out
