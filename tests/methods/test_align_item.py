"""Item-level preference alignment (``align.score=item``) of an item-head sequence SFT model, tiny Llama.

What could go wrong and is checked: item log-probs taken at the wrong position, depending on the batch's
padding, or not normalised over the catalogue; a loss that is not S-DPO / DMPO over those log-probs; no
gradient reaching the fresh adapter through the head; a recipe that trains on title scores, does not record
the setting, evaluates with another score than the one it aligned, or accepts a model without a head.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.config import load_config  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.lm.lora import LoRAConfig, attach_lora, load_lm  # noqa: E402
from recalign.lm.sequence import item_logprobs  # noqa: E402
from recalign.methods.align import AlignConfig, ItemPreferenceObjective, run_align  # noqa: E402
from recalign.methods.sft import SFTConfig, run_sft  # noqa: E402

SASREC_FAST = ["epochs=2", "early_stopping=false"]


def _sft_overrides(data_dir, model_dir, *, head: bool) -> dict:
    over = {
        "format": "sequence", "window": 8, "min_context": 2, "n_train": 0, "max_history": 6,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": {**_lm_tiny.TINY_TRAINING, "max_steps": 4, "save_steps": 4},
        "eval": {"n_test": 0, "protocols": ["candidates"]},
        "hybrid": {"enabled": True, "recommender_overrides": SASREC_FAST, "projector_hidden": 8, "item_head": head},
    }  # fmt: skip
    return _lm_tiny.sft_overrides(data_dir, model_dir, **over)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root, data_dir, model_dir = _lm_tiny.tiny_env(tmp_path_factory.mktemp("align_item"))
    head = run_sft(load_config(SFTConfig, overrides=_sft_overrides(data_dir, model_dir, head=True)), root / "head",
                   progress=False)  # fmt: skip
    plain = run_sft(load_config(SFTConfig, overrides=_sft_overrides(data_dir, model_dir, head=False)),
                    root / "plain", progress=False)  # fmt: skip
    yield data_dir, root / "head", root / "plain"
    del head, plain
    torch.set_num_threads(before)


def _prompts(model_dir):
    from recalign.data.prepare import DataPrepareConfig
    from recalign.lm.prompts import recent_history
    from recalign.lm.sequence import SequenceCodec
    from recalign.methods import load_data

    model, tok, _ = load_lm(str(model_dir), dtype="float32")
    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(_data_dir(model_dir)), split="llara",
                                       candidates=5))  # fmt: skip
    codec = SequenceCodec(tok, data.dataset, item_tokens=True)
    hist = list(data.split.stage("train")["history"])[:3]
    # histories of different lengths, so the batch is padded
    prompts = [codec.prompt(recent_history(h, n)) for h, n in zip(hist, (6, 2, 4))]
    return model, prompts


def _data_dir(model_dir: Path) -> Path:
    return model_dir.parent / "ml"


def _naive_item_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """Log-softmax of the head over the catalogue at the last token of one prompt run alone."""
    from recalign.lm.sequence import _item_head, padded_hidden

    h = padded_hidden(model, [prompt])[0, -1]
    return _item_head(model).item_logits(h[None])[0].log_softmax(-1)


def _head_inputs(env):
    """The item-head model, three prompts of different lengths and each prompt's three items."""
    model, prompts = _prompts(env[1])
    return model, prompts, [[0, 3, 5], [2, 1, 4], [7, 0, 1]]


def test_item_logprobs_equal_the_per_prompt_head_softmax(env):
    model, prompts, items = _head_inputs(env)
    with torch.no_grad():
        got = item_logprobs(model, prompts, items)
        for b, p in enumerate(prompts):
            full = _naive_item_logprobs(model, p)
            assert torch.exp(full).sum().item() == pytest.approx(1.0, abs=1e-5)  # a catalogue softmax
            assert torch.allclose(got[b], full[items[b]], atol=1e-5)


def test_item_objective_is_sdpo_and_dmpo_over_item_logprobs_with_gradients(env):
    model, prompts, items = _head_inputs(env)
    with torch.no_grad():
        policy = item_logprobs(model, prompts, items)
    ref = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, -2.5], [-2.0, -2.0, -2.0]])
    r = policy - ref
    beta = 0.5
    batch = {"prompt": prompts, "items": items, "ref": ref}
    loss, logs = ItemPreferenceObjective("sdpo", beta)(model, batch)
    expected = torch.log1p(torch.exp(beta * (r[:, 1:] - r[:, :1])).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["rewards/chosen"] == pytest.approx((beta * r[:, 0]).mean().item(), rel=1e-4)
    loss, _ = ItemPreferenceObjective("dmpo", beta, nll_weight=0.3)(model, batch)
    margin = beta * r[:, 0] - beta * r[:, 1:].mean(1)
    expected = (-torch.nn.functional.logsigmoid(margin) + 0.3 * -policy[:, 0]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a fresh adapter's gradient comes through the head
    peft = attach_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0.0, 0.1)
    loss, _ = ItemPreferenceObjective("sdpo", 1.0)(peft, batch)
    loss.backward()
    grads = [p.grad.abs().sum().item() for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g > 0 for g in grads)


def _align(data_dir, start, out, cfg_out: list | None = None, **over):
    cfg = load_config(
        AlignConfig,
        overrides={
            "model": str(start), "loss": "sdpo", "negatives": 2, "score": "item",
            "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
            "n_train": 8, "max_history": 6, "dtype": "float32",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
            "training": {"learning_rate": 2e-2, "lr_scheduler": "constant", "max_steps": 6, "batch_size": 4,
                         "save_steps": 6, "logging_steps": 1, "progress": False},
            "eval": {"n_test": 6, "protocols": ["candidates"]},
            **over,
        },
    )  # fmt: skip
    if cfg_out is not None:
        cfg_out.append(cfg)
    return run_align(cfg, out, progress=False)


def test_item_sdpo_run_learns_records_its_score_and_evaluates_with_the_head(env, tmp_path):
    import json

    data_dir, head_dir, _ = env
    out = tmp_path / "sdpo-item"
    cfgs = []
    _align(data_dir, head_dir, out, cfg_out=cfgs)
    history = json.loads((out / "checkpoints" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(3), abs=1e-3)  # fresh adapter: policy = reference
    assert min(losses[1:]) < losses[0] - 0.05  # and it learns
    (rec,) = read_records(out / "records.json")
    assert rec.extra["score"] == "item" and rec.extra["item_score"] == "item"
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["score"] == "item"
    # the evaluation resolved auto -> item on a copy: the caller's config and the saved one stay as asked
    assert cfgs[0].eval.item_score == "auto"
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["item_score"] == "auto"
    # the saved run reloads with the head and ranks by it
    model, _, _ = load_lm(str(out), dtype="float32")
    from recalign.lm.sequence import _item_head

    assert _item_head(model) is not None


def test_item_score_needs_a_model_with_a_head(env, tmp_path):
    data_dir, _, plain_dir = env
    with pytest.raises(RecalignInputError, match="no item head") as e:
        _align(data_dir, plain_dir, tmp_path / "x")
    assert "\n" not in str(e.value)


def test_item_score_rejects_the_choice_prompt():
    with pytest.raises(RecalignInputError, match="prompt must be candidates"):
        load_config(AlignConfig, overrides={"score": "item", "prompt": "choice"})


def test_cli_refuses_item_score_on_a_model_without_a_head(env, tmp_path, capsys):
    from recalign.cli.main import main

    data_dir, _, plain_dir = env
    argv = ["align", "--model", str(plain_dir), "--output", str(tmp_path / "o"), "score=item", "negatives=2",
            "n_train=4", f"data.path={data_dir}", "data.candidates=5", "dtype=float32", "eval.n_test=0",
            "eval.protocols=[candidates]"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no item head" in err
