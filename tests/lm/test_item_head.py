"""The collaborative item head of hybrid sequence SFT (``hybrid.item_head``, E4SRec / CLLM4Rec style).

Each test could fail in a specific way: an item cross-entropy read from the wrong hidden state (the
span's first token instead of the one before it, or a pre-norm state) or over the wrong labels; a head
whose gradient stopped before the projector or the adapter; head scores that depended on the padding of
the batch or were taken at the wrong position; a saved model that lost its head or loaded a damaged one;
a text-only / head-less model whose loss or scores moved; a training run in which the head did not learn.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.lm.hybrid import (
    PROJECTOR_FILE,
    PROJECTOR_META,
    attach_item_tokens,
    item_head_of,
    item_tokens_of,
    load_item_tokens,
    load_item_tokens_state,
    new_item_tokens,
    prompt_embeddings,
    save_item_tokens,
)
from recalign.lm.lora import LoRAConfig, attach_lora
from recalign.lm.scoring import answer_logprobs
from recalign.lm.sequence import (
    SequenceCodec,
    SequenceLMRecommender,
    SequenceObjective,
    Window,
    sequence_examples,
    sequence_logprobs,
    sequence_token_logprobs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

D_REC = 8
ITEMS = np.array([3, 7, 1, 12, 5, 20])


def _batch(examples: list[dict]) -> dict:
    return {k: [e[k] for e in examples] for k in examples[0]}


def _windows():
    return [
        Window(user=0, start=0, items=ITEMS, first_target=2),
        Window(user=1, start=0, items=np.array([9, 8, 7]), first_target=1),
    ]


def _with_tokens(model, n_items: int, *, head: bool, lora: bool = True, seed: int = 0):
    """A copy of ``model`` with a non-trivial LoRA adapter and a trainable projector (and item head)."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    if lora:
        m = attach_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    table = torch.randn(n_items, D_REC, generator=torch.Generator().manual_seed(seed + 7))
    module = new_item_tokens(m, table, hidden=16)
    if head:
        module.add_item_head()
        with torch.no_grad():  # a head far from uniform, so that every position and label matters
            module.item_head.weight.normal_(0.0, 1.0)
            module.item_bias.normal_(0.0, 1.0)
    attach_item_tokens(m, module, trainable=True)
    return m


@pytest.fixture
def ds(tiny_dataset):
    return tiny_dataset()


@pytest.fixture
def head_model(tiny_model, ds):
    return _with_tokens(tiny_model, ds.n_items, head=True)


def _rows(ds, n=5):
    split = build_split(ds, "llara", n_candidates=5, seed=0)
    return split.stage("test").head(n)


def _naive_hidden(model, ids: list[int]) -> torch.Tensor:
    """``[T, d]`` final hidden states of one unpadded row, checked to be what the LM head reads."""
    inputs = prompt_embeddings(model, torch.tensor([ids]))
    kw = {"input_ids": torch.tensor([ids])} if inputs is None else {"inputs_embeds": inputs}
    out = model(**kw, output_hidden_states=True)
    h = out.hidden_states[-1][0]
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(h), out.logits[0], atol=1e-4, rtol=1e-4)
    return h


def _naive_item_logits(model, h: torch.Tensor) -> torch.Tensor:
    module = item_tokens_of(model)
    table = module.item_table / module.item_table.norm(dim=1).mean()  # unit mean row norm, as documented
    keys = table @ module.item_head.weight.t()  # Q(E): [n_items, d_lm]
    return h.float() @ keys.t() + module.item_bias


# ---------------------------------------------------------------------- documents and the objective
def test_documents_carry_the_item_of_every_target_span(ds, tiny_tokenizer):
    for item_tokens in (False, True):
        docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=item_tokens)
        assert docs[0]["items"] == [int(i) for i in ITEMS[2:]]
        assert docs[1]["items"] == [8, 7]
        assert all(len(d["items"]) == len(d["targets"]) for d in docs)


@pytest.mark.parametrize("item_tokens", [True, False])
def test_item_ce_equals_a_naive_per_row_computation(ds, tiny_tokenizer, head_model, item_tokens):
    """loss = title NLL + w * mean CE over the catalogue, the CE read at ``span_start - 1`` (for hybrid
    documents: the previous item's soft token), all from explicit per-row forwards."""
    docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=item_tokens)
    batch = _batch(docs)
    w = 0.7
    head_model.train()
    loss, logs = SequenceObjective(item_head_weight=w)(head_model, batch)
    nll_sum, n_tok, ce_sum, n_items = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids, spans, items in zip(batch["tokens"], batch["targets"], batch["items"]):
            h = _naive_hidden(head_model, ids)
            logits = head_model.get_output_embeddings()(h)
            item_logits = _naive_item_logits(head_model, h)
            for (start, end), item in zip(spans, items):
                if item_tokens:
                    assert ids[start - 1] == -(ids_item_before(ds, ids, start) + 1)
                tgt = torch.tensor(ids[start:end])
                nll_sum += torch.nn.functional.cross_entropy(
                    logits[start - 1 : end - 1], tgt, reduction="sum"
                ).item()
                n_tok += end - start
                ce_sum += torch.nn.functional.cross_entropy(
                    item_logits[start - 1][None], torch.tensor([item])
                ).item()
                n_items += 1
    assert logs["nll"].item() == pytest.approx(nll_sum / n_tok, rel=1e-5)
    assert logs["item_ce"].item() == pytest.approx(ce_sum / n_items, rel=1e-5)
    assert loss.item() == pytest.approx(nll_sum / n_tok + w * ce_sum / n_items, rel=1e-5)
    # another label (a shifted item) gives another CE: the labels are the spans' items
    shifted = dict(batch, items=[[(i + 1) % ds.n_items for i in its] for its in batch["items"]])
    with torch.no_grad():
        _, other = SequenceObjective(item_head_weight=w)(head_model, shifted)
    assert abs(other["item_ce"].item() - logs["item_ce"].item()) > 1e-3


def ids_item_before(ds, ids: list[int], start: int) -> int:
    """The item whose soft token sits right before ``start`` (hybrid documents)."""
    return -ids[start - 1] - 1


def test_item_head_gradient_reaches_q_b_projector_and_lora(ds, tiny_tokenizer, head_model):
    docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=True)
    head_model.train()
    head_model.zero_grad()
    _, item_lp = sequence_logprobs(head_model, _batch(docs), items=True)
    (-item_lp.mean()).backward()  # the head's term alone
    module = item_tokens_of(head_model)
    for name, p in [("Q", module.item_head.weight), ("b", module.item_bias)] + [
        (n, p) for n, p in module.projector.named_parameters()
    ]:
        assert p.grad is not None and p.grad.abs().max() > 0, name
    lora = [p for n, p in head_model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert max(p.grad.abs().max().item() for p in lora) > 0
    # the trainer's optimiser: every parameter with requires_grad, the head's included
    trainable = {id(p) for p in head_model.parameters() if p.requires_grad}
    assert {id(module.item_head.weight), id(module.item_bias)} <= trainable


# ---------------------------------------------------------------------- scoring
def _naive_item_scores(model, codec, ex, max_history) -> list[np.ndarray]:
    out = []
    with torch.no_grad():
        for h in ex["history"]:
            ids = codec.prompt(np.asarray(h)[-max_history:])
            lp = _naive_item_logits(model, _naive_hidden(model, ids)[-1][None]).log_softmax(-1)[0]
            out.append(lp.double().numpy())
    return out


def test_item_and_sum_scores_equal_naive_per_row_scores(ds, tiny_tokenizer, head_model):
    head_model.eval()
    ex = _rows(ds)
    kw = dict(max_history=4, batch_size=3, progress=False)  # 3 prompts of different lengths per pass
    item = SequenceLMRecommender(head_model, tiny_tokenizer, ds, item_score="item", **kw)
    title = SequenceLMRecommender(head_model, tiny_tokenizer, ds, item_score="title", **kw)
    default = SequenceLMRecommender(head_model, tiny_tokenizer, ds, **kw)
    assert default.item_score == "sum" and item.item_tokens
    codec = SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    prompts = [codec.prompt(np.asarray(h)[-4:]) for h in ex["history"]]
    assert len({len(p) for p in prompts}) > 1 and all(p[-1] < 0 for p in prompts)  # ends on a soft token
    naive = _naive_item_scores(head_model, codec, ex, 4)
    want = np.stack([lp[np.asarray(c)] for lp, c in zip(naive, ex["candidates"])])
    got_item = item.score_candidates(ex)
    np.testing.assert_allclose(got_item, want, atol=1e-5)
    got_title = title.score_candidates(ex)
    answers = [[codec.lines[int(c)] for c in cands] for cands in ex["candidates"]]
    with torch.no_grad():
        plain = answer_logprobs(head_model, prompts, answers).sum.double().numpy()
    np.testing.assert_array_equal(got_title, plain)  # title mode: today's scores
    np.testing.assert_allclose(default.score_candidates(ex), got_title + got_item, atol=1e-9)
    assert np.abs(got_item).min() > 1e-6 and np.abs(got_item - got_item[:, :1]).max() > 1e-3
    # the whole catalogue, every mode
    full_item = item.score_all(ex.head(2))
    for r in range(2):
        np.testing.assert_allclose(full_item[r], naive[r], atol=1e-5)
    full_sum = default.score_all(ex.head(2))
    np.testing.assert_allclose(full_sum, title.score_all(ex.head(2)) + full_item, atol=1e-9)


def test_head_modes_without_a_head_are_refused_and_scores_are_unchanged(ds, tiny_tokenizer, tiny_model):
    """A hybrid model without a head: default title, the same scores as the shared-prefix scorer, the
    objective exactly the mean token NLL (no item_ce), and an explicit item/sum is a one-line error."""
    model = _with_tokens(tiny_model, ds.n_items, head=False)
    model.eval()
    assert item_head_of(model) is None
    ex = _rows(ds)
    rec = SequenceLMRecommender(model, tiny_tokenizer, ds, max_history=4, progress=False)
    assert rec.item_score == "title"
    codec = SequenceCodec(tiny_tokenizer, ds, item_tokens=True)
    prompts = [codec.prompt(np.asarray(h)[-4:]) for h in ex["history"]]
    answers = [[codec.lines[int(c)] for c in cands] for cands in ex["candidates"]]
    with torch.no_grad():
        want = answer_logprobs(model, prompts, answers).sum.double().numpy()
    np.testing.assert_array_equal(rec.score_candidates(ex), want)
    for mode in ("item", "sum"):
        with pytest.raises(RecalignInputError, match="item head") as e:
            SequenceLMRecommender(model, tiny_tokenizer, ds, item_score=mode, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(RecalignInputError, match="unknown item score"):
        SequenceLMRecommender(model, tiny_tokenizer, ds, item_score="both", progress=False)
    docs = sequence_examples(tiny_tokenizer, ds, _windows(), item_tokens=True)
    with torch.no_grad():
        loss, logs = SequenceObjective()(model, _batch(docs))
        lp = sequence_token_logprobs(model, _batch(docs))
        # documents cached before "items" existed still train a head-less model
        old = _batch([{k: v for k, v in d.items() if k != "items"} for d in docs])
        loss_old, _ = SequenceObjective()(model, old)
    assert "item_ce" not in logs
    assert loss.item() == (-lp.sum() / lp.numel()).item() == loss_old.item()
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    def evaluate(mode):
        cfg = EvalConfig(n_test=len(ex), protocols=["candidates"], item_score=mode)
        return evaluate_lm(model, tiny_tokenizer, ds, ex, method="m", split_name="llara", cfg=cfg, max_history=4,
                           progress=False, prompt_format="sequence")[0]  # fmt: skip

    assert "item_score" not in evaluate("auto").extra  # records of head-less models as before
    with pytest.raises(RecalignInputError, match="eval.item_score") as e:
        evaluate("sum")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- saving and loading
def test_saved_head_reloads_with_identical_scores_in_every_mode(tmp_path, ds, tiny_tokenizer):
    """Through ``load_lm`` (the real save/load path, not a module copy): all three modes reproduced."""
    from recalign.lm.loading import build_tiny_llama, load_model
    from recalign.lm.lora import load_lm, save_adapter

    model_dir = tmp_path / "base"
    clean = build_tiny_llama(tiny_tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=0)
    clean.save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model_dir)
    model, tok = load_model(model_dir)
    model = _with_tokens(model, ds.n_items, head=True)
    adapter = save_adapter(model, tmp_path / "run" / "adapter", base_model=str(model_dir),
                           extra={"method": "sft-item-head", "seed": 0, "max_history": 4,
                                  "prompt_format": "sequence"})  # fmt: skip
    meta = json.loads((adapter / PROJECTOR_META).read_text())
    assert meta["item_head"] is True
    model.eval()
    ex = _rows(ds)
    modes = ("title", "item", "sum")
    kw = dict(max_history=4, batch_size=2, progress=False)
    before = {
        m: SequenceLMRecommender(model, tok, ds, item_score=m, **kw).score_candidates(ex) for m in modes
    }
    kept, tok2, _ = load_lm(str(tmp_path / "run"), merge=False)
    assert item_head_of(kept) is not None
    for m in modes:
        np.testing.assert_array_equal(SequenceLMRecommender(kept, tok2, ds, item_score=m, **kw).score_candidates(ex),
                                      before[m], err_msg=m)  # fmt: skip
    merged, _, _ = load_lm(str(adapter))
    for m in modes:
        got = SequenceLMRecommender(merged, tok2, ds, item_score=m, **kw).score_candidates(ex)
        np.testing.assert_allclose(got, before[m], atol=1e-4, err_msg=m)
    # the evaluation path (`recalign sft` / `recalign evaluate`): eval.item_score, auto = sum
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    def evaluate(mode, prompt_format="sequence"):
        cfg = EvalConfig(n_test=len(ex), protocols=["candidates"], item_score=mode)
        return evaluate_lm(kept, tok2, ds, ex, method="sft-item-head", split_name="llara", cfg=cfg,
                           max_history=4, progress=False, prompt_format=prompt_format)[0]  # fmt: skip

    assert evaluate("auto").extra["item_score"] == "sum"
    assert evaluate("auto").metrics == evaluate("sum").metrics
    assert evaluate("item").extra["item_score"] == "item"
    with pytest.raises(RecalignInputError, match="eval.item_score"):
        evaluate("item", prompt_format="candidates")


def _saved(tmp_path, model) -> Path:
    d = tmp_path / "proj"
    save_item_tokens(model, d)
    return d / PROJECTOR_FILE


def _rewrite(file: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(file), metadata=meta)


def test_head_round_trip_and_old_files_without_a_head(tmp_path, ds, head_model, tiny_model):
    file = _saved(tmp_path, head_model)
    loaded = load_item_tokens(file)
    assert loaded.has_item_head
    for name, t in item_tokens_of(head_model).state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t.cpu()), name
    # a file of a model without a head (as every file written before the head): loads, no head
    plain = _with_tokens(tiny_model, ds.n_items, head=False, lora=False)
    d = tmp_path / "plain"
    save_item_tokens(plain, d)
    meta = json.loads((d / PROJECTOR_META).read_text())
    meta.pop("item_head")
    (d / PROJECTOR_META).write_text(json.dumps(meta))
    assert not load_item_tokens(d).has_item_head
    # resuming a head run from a head-less checkpoint (or the reverse) is refused
    with pytest.raises(RecalignInputError, match="item head"):
        load_item_tokens_state(head_model, d)
    assert load_item_tokens_state(head_model, file.parent)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.update(item_bias=torch.zeros(3)), "item_bias has shape"),
        (lambda t: t.update({"item_head.weight": torch.zeros(5, D_REC)}), "item_head.weight has shape"),
        (lambda t: t.pop("item_bias"), "lacks tensor 'item_bias'"),
        (lambda t: (t.pop("item_bias"), t.pop("item_head.weight")), "item_head is true"),
    ],
)
def test_a_damaged_head_is_a_one_line_error_naming_the_file(tmp_path, head_model, edit, match):
    file = _saved(tmp_path, head_model)
    _rewrite(file, edit)
    with pytest.raises(RecalignInputError, match=match) as e:
        load_item_tokens(file)
    assert "\n" not in str(e.value) and str(file) in str(e.value)


# ---------------------------------------------------------------------- configuration
def test_item_head_settings_are_validated():
    from recalign.config import load_config
    from recalign.methods.hybrid import HybridConfig
    from recalign.methods.sft import SFTConfig
    from recalign.methods.zeroshot import EvalConfig

    with pytest.raises(RecalignInputError, match="hybrid.item_head") as e:
        HybridConfig(item_head=True).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(RecalignInputError, match="item_head_weight"):
        HybridConfig(enabled=True, item_head=True, item_head_weight=-1.0).validate()
    over = {"model": "smollm2", "hybrid": {"enabled": True, "item_head": True}}
    with pytest.raises(RecalignInputError, match="format=sequence"):
        load_config(SFTConfig, overrides={**over, "format": "candidates"})
    assert load_config(
        SFTConfig, overrides={**over, "format": "sequence", "eval": {"protocols": ["candidates"]}}
    )
    with pytest.raises(RecalignInputError, match="eval.item_score"):
        EvalConfig(item_score="both").validate()


# ---------------------------------------------------------------------- a short training run
def _cyclic_ml100k(directory: Path, n_items: int, n_users: int, per_user: int) -> Path:
    """u.data / u.item where every user walks the catalogue in one fixed cyclic order from their own
    start: the next item is a function of the previous one, and every item is about equally popular
    (so the per-item bias alone cannot lower the cross-entropy much below ln n_items)."""
    import _lm_tiny

    directory.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(3).permutation(n_items) + 1
    lines = []
    for u in range(1, n_users + 1):
        start = (u * 5) % n_items
        for k in range(per_user):
            lines.append(f"{u}\t{order[(start + k) % n_items]}\t4\t{880000000 + 1000 * k + u}")
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    genres = "|".join(["0"] * 18 + ["1"])
    titles = _lm_tiny.TITLES[:n_items]
    item_lines = [f"{i}|{t}|01-Jan-1995||http://x|{genres}" for i, t in enumerate(titles, 1)]
    (directory / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
    return directory


def test_item_head_sft_run_trains_the_head_and_its_ce_falls(tmp_path):
    import _lm_tiny

    from recalign.config import load_config
    from recalign.evaluation.records import read_records
    from recalign.methods.sft import SFTConfig, run_sft

    n_items = 16
    data_dir = _cyclic_ml100k(tmp_path / "ml", n_items, n_users=16, per_user=9)
    model_dir = _lm_tiny.write_tiny_model(tmp_path / "model")
    over = _lm_tiny.sft_overrides(
        data_dir, model_dir, method="sft-item-head", format="sequence", window=8, min_context=2, n_train=0,
        max_history=6, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        # all 16 documents per step: the 4-document batches of the other tiny runs make the head's
        # gradient too noisy to show a trend in a few dozen steps
        training={**_lm_tiny.TINY_TRAINING, "learning_rate": 3e-3, "batch_size": 16, "max_steps": 50,
                  "save_steps": 50},
        eval={"n_test": 6, "protocols": ["candidates"]},
        hybrid={"enabled": True, "recommender_overrides": ["epochs=2", "early_stopping=false"],
                "projector_hidden": 8, "item_head": True},
    )  # fmt: skip
    cfg = load_config(SFTConfig, overrides=over)
    res = run_sft(cfg, tmp_path / "run", progress=False)
    ce = [h["item_ce"] for h in res.log_history if "item_ce" in h]
    assert len(ce) == 50 and all("nll" in h for h in res.log_history if "item_ce" in h)
    first, last = float(np.mean(ce[:3])), float(np.mean(ce[-5:]))
    assert abs(first - np.log(n_items)) < 0.1  # starts near uniform: ~ln 16, the bias cannot beat it
    assert last < 0.8 * first, (first, last)  # learned which item follows which
    assert ce[-1] < min(ce[:10])
    # the optimiser moved the head: the bias started at zeros, Q at its seeded init
    module = load_item_tokens(tmp_path / "run" / "adapter")
    assert module.has_item_head and module.item_bias.abs().max() > 1e-3
    torch.manual_seed(cfg.training.seed + 1)
    init = torch.nn.Linear(module.d_rec, module.d_lm, bias=False).weight.detach()
    init.normal_(0.0, 0.1 / module.d_lm**0.5)
    assert (module.item_head.weight - init).abs().max() > 1e-3
    (rec,) = read_records(tmp_path / "run" / "records.json")
    assert rec.extra["item_score"] == "sum" and rec.extra["item_tokens"] is True
