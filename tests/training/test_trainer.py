"""The training layer: objective plumbing, diagnostics logging, checkpoints and exact resumption.

These tests use a self-contained objective (plain teacher-forced NLL through the model's forward) so
that they exercise the trainer independently of the scoring layer; SFT through ``answer_logprobs`` is
tested in tests/methods/test_sft.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from _lm_tiny import widen_embeddings
from transformers import TrainerCallback

from recalign.errors import RecalignInputError
from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.lm.lora import LoRAConfig, attach_lora
from recalign.training import (
    PromptAnswerCollator,
    TrainingConfig,
    find_resume_checkpoint,
    list_checkpoints,
    train,
)

TEXTS = [f"user watched movie {i} and then movie {i + 1}" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def make_examples(tok, n=16):
    out = []
    for i in range(n):
        out.append(
            {
                "prompt": tok(f"user watched movie {i} and then")["input_ids"],
                "answers": [tok(f" movie {i + 1}", add_special_tokens=False)["input_ids"]],
            }
        )
    return out


def naive_nll(model, batch):
    """Mean answer-token NLL via one full forward per example (reference objective for tests)."""
    losses = []
    for p, (a,) in zip(batch["prompt"], batch["answers"]):
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum"))
    n = sum(len(a[0]) for a in batch["answers"])
    loss = torch.stack(losses).sum() / n
    return loss, {"nll": loss.detach(), "answer_tokens": float(n)}


def fresh_model(tok):
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    widen_embeddings(model)
    return attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))


def cfg(**kw):
    base = dict(learning_rate=5e-3, max_steps=6, batch_size=4, save_steps=3, logging_steps=1, progress=False)
    base.update(kw)
    return TrainingConfig(**base)


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after ``step`` optimiser steps."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_collator_keeps_ragged_lists_and_stacks_tensors():
    batch = PromptAnswerCollator()(
        [
            {"prompt": [1, 2, 3], "answers": [[4]], "ref": torch.tensor([0.5, 1.0])},
            {"prompt": [1], "answers": [[5, 6], [7]], "ref": torch.tensor([2.0, 3.0])},
        ]
    )
    assert batch["prompt"] == [[1, 2, 3], [1]]
    assert batch["answers"] == [[[4]], [[5, 6], [7]]]
    assert batch["ref"].shape == (2, 2)


def test_diagnostics_logged_and_checkpoints_are_safetensors_adapters(tmp_path, tok):
    model = fresh_model(tok)
    out = train(model, make_examples(tok), naive_nll, cfg(), tmp_path / "ckpt")
    assert out.global_step == 6
    logged = [h for h in out.log_history if "loss" in h]
    assert logged and all("nll" in h and h["answer_tokens"] > 0 for h in logged)
    ckpts = list_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in ckpts] == ["checkpoint-3", "checkpoint-6"]
    files = {p.name for p in ckpts[-1].iterdir()}
    assert "adapter_model.safetensors" in files
    assert not any(f.endswith(".bin") for f in files)  # weights and args: no pickles
    assert "training_args.json" in files
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_gradient_accumulation_divides_the_loss(tmp_path, tok):
    """With grad_accum=2 the logged loss stays on the per-example scale (not doubled)."""
    model = fresh_model(tok)
    out = train(model, make_examples(tok), naive_nll, cfg(max_steps=2, batch_size=2, grad_accum=2), tmp_path)
    first = next(h for h in out.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(first["nll"], rel=1e-4)


def test_refuses_existing_checkpoints_without_resume(tmp_path, tok):
    train(fresh_model(tok), make_examples(tok), naive_nll, cfg(max_steps=3), tmp_path)
    with pytest.raises(RecalignInputError, match="--resume"):
        find_resume_checkpoint(tmp_path, resume=False)
    assert find_resume_checkpoint(tmp_path / "empty", resume=True) is None


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tok):
    examples = make_examples(tok)
    full_model = fresh_model(tok)
    full = train(full_model, examples, naive_nll, cfg(), tmp_path / "full")

    part_model = fresh_model(tok)
    part = train(part_model, examples, naive_nll, cfg(), tmp_path / "part", callbacks=[StopAt(3)])
    assert part.global_step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["checkpoint-3"]

    resumed_model = fresh_model(tok)  # a new process would rebuild the model from scratch
    resumed = train(resumed_model, examples, naive_nll, cfg(resume=True), tmp_path / "part")
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-3"
    assert resumed.global_step == 6
    # The resumed run only trained steps 4..6, and they match the uninterrupted run's.
    resumed_losses = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    full_losses = {h["step"]: h["loss"] for h in full.log_history if "loss" in h}
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)
    a, b = adapter_state(full_model), adapter_state(resumed_model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resuming_a_finished_run_trains_no_further_step(tmp_path, tok):
    """A run interrupted after its last checkpoint (e.g. while evaluating) whose ``max_steps`` ends
    mid-epoch: transformers' loop would run one extra step on resume; the weights must come back as saved."""
    examples = make_examples(tok)  # 16 examples, batch 4: 4 steps per epoch, max_steps=2 ends mid-epoch
    run = cfg(max_steps=2, save_steps=2, lr_scheduler="constant")
    done_model = fresh_model(tok)
    done = train(done_model, examples, naive_nll, run, tmp_path)
    again_model = fresh_model(tok)
    run.resume = True
    again = train(again_model, examples, naive_nll, run, tmp_path)
    assert again.resumed_from is not None and again.resumed_from.name == "checkpoint-2"
    assert again.global_step == 2
    assert again.train_loss == pytest.approx(done.train_loss, rel=1e-6)
    a, b = adapter_state(done_model), adapter_state(again_model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
