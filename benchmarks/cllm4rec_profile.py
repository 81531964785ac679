"""Where one CLLM4Rec step's time goes on SmolLM2 (full depth, 1 thread), and one epoch's cost before /
after removing the waste -> ``results/cllm4rec_profile.json``.

Measured on real ML-100K documents of the paper setting (``configs/cllm4rec_ml100k.yaml``: holdout split
with its validation stage, every interaction once per pretraining epoch, the whole history in the
recommendation prompt):

- one **collaborative** step (16 documents of <= 30 items), one **content** step (16 item descriptions)
  and one **recommendation** step (16 users, whole history): backbone forward, head (item head /
  vocabulary head) + loss, backward (through the frozen backbone to the ID rows), each timed once;
- variants: ``naive`` (vocabulary head on every position, batches in random order = the code before
  #16, float32), ``before`` (the code before #16: vocabulary head on content positions only, random
  batches, float32), ``after`` (+ batches of similar length, bfloat16 where the CPU has it natively),
  ``after+pack`` (+ packing into rows of 128 tokens: measured, not used when it adds tokens),
  ``after+eager`` (``after`` with eager attention instead of sdpa: sdpa's CPU flash-attention
  backward was a third of a bf16 step in a torch.profiler trace; the config's default since);
- every step is timed twice and the faster run kept (the first call of a shape pays allocations).

Epoch cost = the measured seconds per (padded or packed) token of a step kind x the exact number of
tokens that kind puts through the backbone in one epoch (computed from the epoch's real batches), plus
one validation pass (forward only, every validation user). Times are single measurements on a CPU
shared with another job: read them as +-20%.

The file also holds ``benchmark_estimate``: the CPU minutes of ``python benchmarks/cllm4rec.py``
(every variant x seed, to convergence) from these epoch costs, under a stated number of fine-tuning
epochs (early stopping decides the real one). ``--estimate`` recomputes only that section from the
measurements already in the file (no model is loaded); ``--eager-only`` measures only the
``*/bf16-eager`` steps and merges them into the file (each run's command is recorded in it).

Usage: ``python benchmarks/cllm4rec_profile.py [--output results/cllm4rec_profile.json] [--estimate]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recalign.config import load_config
from recalign.evaluation.records import script_command
from recalign.logs import parse_args
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.documents import (
    collab_documents,
    collate_lm,
    collate_rec,
    content_documents,
    length_buckets,
    pack_rows,
    rec_documents,
    rec_prompt,
)
from recalign.methods.cllm4rec.pipeline import load_data
from recalign.methods.cllm4rec.recommender import (
    build_model,
    cpu_has_native_bf16,
    recent_unique,
    validation_examples,
)
from recalign.methods.cllm4rec.training import TrainingData

CONFIG = "configs/cllm4rec_ml100k.yaml"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def profile_lm_step(model, batch, side: str, head: str, all_positions: bool = False) -> dict:
    """Backbone forward / head + loss / backward seconds of one LM step (collab or content)."""
    for p in model.parameters():
        p.grad = None
    h, t_fwd = _timed(lambda: model._lm_hidden(batch, side))
    rows, pos = batch["pred_pos"][:, 0], batch["pred_pos"][:, 1]

    def head_loss():
        if head == "item":
            return F.cross_entropy(model.item_logits(h[rows, pos]), batch["targets"])
        if all_positions:  # the naive way: the vocabulary head on every position, then pick
            logits = model.word_logits(h).float()
            return F.cross_entropy(logits[rows, pos], batch["targets"])
        return F.cross_entropy(model.word_logits(h[rows, pos]).float(), batch["targets"])

    loss, t_head = _timed(head_loss)
    _, t_bwd = _timed(loss.backward)
    head_positions = int(h.shape[0] * h.shape[1]) if all_positions else int(len(rows))
    return _step_record(batch, t_fwd, t_head, t_bwd, loss, head_positions=head_positions)


def _step_record(batch, t_fwd: float, t_head: float, t_bwd: float, loss, **extra) -> dict:
    """One profiled step: the three phases' seconds, the batch's shape and the loss."""
    return {
        "backbone_forward_s": round(t_fwd, 3),
        "head_and_loss_s": round(t_head, 3),
        "backward_s": round(t_bwd, 3),
        "step_s": round(t_fwd + t_head + t_bwd, 3),
        "rows": int(batch["input_ids"].shape[0]),
        "tokens_through_backbone": int(batch["input_ids"].numel()),
        "real_tokens": int(batch["attention_mask"].sum()),
        **extra,
        "loss": round(float(loss), 4),
    }


def profile_rec_step(model, batch) -> dict:
    for p in model.parameters():
        p.grad = None
    h, t_fwd = _timed(lambda: model.hidden_states(batch["input_ids"], batch["attention_mask"], "collab"))

    def head_loss():
        last = batch["attention_mask"].sum(1) - 1
        logp = F.log_softmax(model.item_logits(h[torch.arange(len(h)), last]), dim=-1)
        return -logp[batch["target_rows"], batch["targets"]].sum() / len(logp)

    loss, t_head = _timed(head_loss)
    _, t_bwd = _timed(loss.backward)
    return _step_record(batch, t_fwd, t_head, t_bwd, loss)


def best_of_two(fn) -> dict:
    a, b = fn(), fn()
    return a if a["step_s"] <= b["step_s"] else b


def random_batches(docs, batch_size: int):
    """The batching before #16: consecutive batches of the epoch's shuffled documents."""
    return [docs[i : i + batch_size] for i in range(0, len(docs), batch_size)]


def epoch_tokens(batches, pack: int, rec: bool = False) -> int:
    """Tokens one epoch puts through the backbone: rows x width per batch (padding included)."""
    total = 0
    for docs in batches:
        lengths = [len(d.prompt) + (0 if rec else len(d.main)) for d in docs]
        layout = pack_rows(lengths, pack) if pack > 0 else [[i] for i in range(len(docs))]
        width = max(sum(lengths[i] for i in row) for row in layout)
        total += len(layout) * width
    return total


FINETUNE_EPOCHS_ASSUMED = 10  # best epoch ~7 + patience 3; bounds: patience + 1 and finetune.epochs


def benchmark_estimate(report: dict, cfg: CLLM4RecConfig, seeds: int = 2) -> dict:
    """CPU minutes of benchmarks/cllm4rec.py from the measured 'after' costs (see the module doc)."""
    steps, tok, bpe = report["steps"], report["tokens_per_epoch"], report["batches_per_epoch"]
    lo = "bf16" if report["machine"]["native_bf16"] else "fp32"
    if f"collab/{lo}-eager" in steps:  # the config's default kernel (model.attn_implementation: auto)
        lo += "-eager"

    def per_token(key):
        return steps[key]["step_s"] / steps[key]["tokens_through_backbone"]

    val = report["epoch_seconds"]["after"]["validation_s"]
    collab = per_token(f"collab/{lo}") * tok["collab/buckets"]
    content_epoch = per_token(f"content/{lo}") * tok["content/buckets"]
    pre_content = cfg.pretrain.content_ratio * bpe["collab"] / bpe["content"] * content_epoch
    rec = per_token(f"rec/{lo}") * tok["rec/buckets"]
    fine_content = cfg.finetune.content_ratio * bpe["rec"] / bpe["content"] * content_epoch
    ep, ef = cfg.pretrain.epochs, FINETUNE_EPOCHS_ASSUMED

    def run_min(with_content: bool, fine_epochs: int) -> float:
        pre = collab + (pre_content if with_content else 0) + (val if cfg.pretrain.validate_every else 0)
        fine = rec + (fine_content if with_content else 0) + val
        return (ep * pre + fine_epochs * fine) / 60

    full, no_content = run_min(True, ef), run_min(False, ef)
    runs = {"cllm4rec": full, "cllm4rec-no-mutual": full, "cllm4rec-no-content": no_content}
    total = seeds * sum(runs.values()) + full  # + the loo run of cllm4rec (one seed)
    lo_b, hi_b = cfg.finetune.patience + 1, cfg.finetune.epochs
    bound = [seeds * (2 * run_min(True, e) + run_min(False, e)) + run_min(True, e) for e in (lo_b, hi_b)]
    return {
        "command": "python benchmarks/cllm4rec.py --seeds 0,1",
        "assumes": f"pretrain {ep} epochs (validated each), fine-tuning {ef} epochs (early stopping: "
        f"between {lo_b} and {hi_b}), per-epoch costs of steps '{lo}' with length buckets, 1 thread",
        "cpu_minutes_per_run": {k: round(v) for k, v in runs.items()},
        "cpu_minutes_total": round(total),
        "cpu_minutes_total_range": [round(b) for b in bound],
        "parts_s_per_epoch": {
            "collab": round(collab),
            "content_in_pretrain": round(pre_content),
            "rec": round(rec),
            "content_in_finetune": round(fine_content),
            "validation": val,
        },  # fmt: skip
    }


def setup(overrides: list[str]):
    """Model, tokenizer, split and the epoch-0 documents / batches of every kind (+ median batches)."""
    cfg = load_config(CLLM4RecConfig, CONFIG, ["model.dtype=float32", "model.num_layers=null", *overrides])
    dataset, split = load_data(cfg)
    from recalign.lm.loading import load_model

    backbone, base_tok = load_model(cfg.model.backbone)
    model, tok = build_model(cfg, dataset.n_users, dataset.n_items, backbone, base_tok)
    data = TrainingData.build(tok, dataset, split.train_sequences(dataset))
    pc, fc, seed = cfg.pretrain, cfg.finetune, cfg.seed
    collab_docs = collab_documents(tok, data.sequences, pc.max_items, seed, 0)
    content_docs = content_documents(tok, data.corpus, pc.max_text_tokens, seed, 0)
    rec_docs = rec_documents(tok, data.sequences, fc.max_items, fc.mask_ratio, seed, 0)
    collab_b = length_buckets(collab_docs, pc.batch_size, seed, 0)
    content_b = length_buckets(content_docs, pc.content_batch_size, seed, 0)
    rec_b = length_buckets(rec_docs, fc.batch_size, seed, 0)

    def median_batch(batches, rec=False):
        widths = [max(len(d.prompt) + (0 if rec else len(d.main)) for d in b) for b in batches]
        return batches[int(np.argsort(widths)[len(widths) // 2])]

    cb, tb, rb = median_batch(collab_b), median_batch(content_b), median_batch(rec_b, rec=True)
    return (
        cfg,
        model,
        tok,
        split,
        (collab_docs, content_docs, rec_docs, collab_b, content_b, rec_b, cb, tb, rb),
    )


def measure_eager(model, tok, cb, tb, rb) -> dict:
    """bf16 steps with eager attention (the config default: model.attn_implementation auto)."""
    model.backbone.to(torch.bfloat16)
    model.backbone.set_attn_implementation("eager")
    pad = tok.pad_id
    return {
        "collab/bf16-eager": best_of_two(
            lambda: profile_lm_step(model, collate_lm(cb, pad), "collab", "item")
        ),
        "content/bf16-eager": best_of_two(
            lambda: profile_lm_step(model, collate_lm(tb, pad), "content", "word")
        ),
        "rec/bf16-eager": best_of_two(lambda: profile_rec_step(model, collate_rec(rb, pad))),
    }


def eager_epoch(report: dict) -> dict:
    steps, tok, bpe = report["steps"], report["tokens_per_epoch"], report["batches_per_epoch"]

    def per_token(key):
        return steps[key]["step_s"] / steps[key]["tokens_through_backbone"]

    share_pre, share_fine = bpe["collab"] / bpe["content"], bpe["rec"] / bpe["content"]  # ratio 1
    content = per_token("content/bf16-eager") * tok["content/buckets"]
    pre = per_token("collab/bf16-eager") * tok["collab/buckets"] + share_pre * content
    fine = per_token("rec/bf16-eager") * tok["rec/buckets"] + share_fine * content
    return {"pretrain_epoch_s": round(pre), "finetune_epoch_s": round(fine),
            "validation_s": report["epoch_seconds"]["after"]["validation_s"]}  # fmt: skip


def eager_only(output: str, command: str, t_start: float) -> int:
    report = json.loads(Path(output).read_text())
    cfg, model, tok, _, batches = setup(["model.attn_implementation=sdpa"])
    cb, tb, rb = batches[-3:]
    report["steps"].update(measure_eager(model, tok, cb, tb, rb))
    report["epoch_seconds"]["after+eager"] = eager_epoch(report)
    report.setdefault("commands", [report["command"]]).append(command)
    report["eager_profile_seconds"] = round(time.time() - t_start, 1)
    report["benchmark_estimate"] = benchmark_estimate(report, cfg)
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["epoch_seconds"], indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="results/cllm4rec_profile.json")
    ap.add_argument("--estimate", action="store_true", help="recompute benchmark_estimate only")
    ap.add_argument("--eager-only", action="store_true", help="measure and merge only the bf16-eager steps")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/cllm4rec_profile.py", argv)
    if args.estimate:
        report = json.loads(Path(args.output).read_text())
        report["benchmark_estimate"] = benchmark_estimate(report, load_config(CLLM4RecConfig, CONFIG))
        report["benchmark_estimate"]["computed_by"] = command
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["benchmark_estimate"], indent=1))
        return 0
    torch.set_num_threads(1)
    t_start = time.time()
    if args.eager_only:
        return eager_only(args.output, command, t_start)
    cfg, model, tok, split, batches = setup(["model.attn_implementation=sdpa"])
    collab_docs, content_docs, rec_docs, collab_b, content_b, rec_b, cb, tb, rb = batches
    pc, fc = cfg.pretrain, cfg.finetune
    pack = pc.pack_tokens or 128
    steps: dict = {}
    pad = tok.pad_id
    steps["collab/fp32"] = best_of_two(lambda: profile_lm_step(model, collate_lm(cb, pad), "collab", "item"))
    steps["content/fp32-vocab-head-all-positions"] = best_of_two(
        lambda: profile_lm_step(model, collate_lm(tb, pad), "content", "word", all_positions=True)
    )
    steps["content/fp32"] = best_of_two(
        lambda: profile_lm_step(model, collate_lm(tb, pad), "content", "word")
    )
    steps["rec/fp32"] = best_of_two(lambda: profile_rec_step(model, collate_rec(rb, pad)))

    bf16 = cpu_has_native_bf16()
    if bf16:
        model.backbone.to(torch.bfloat16)
        steps["collab/bf16"] = best_of_two(
            lambda: profile_lm_step(model, collate_lm(cb, pad), "collab", "item")
        )
        steps["collab/bf16-packed"] = best_of_two(
            lambda: profile_lm_step(model, collate_lm(cb, pad, pack), "collab", "item")
        )
        steps["content/bf16"] = best_of_two(
            lambda: profile_lm_step(model, collate_lm(tb, pad), "content", "word")
        )
        steps["rec/bf16"] = best_of_two(lambda: profile_rec_step(model, collate_rec(rb, pad)))

    # validation: forward only, every validation user (a batch of 32 prompts of median length, timed)
    val = validation_examples(split, cfg.eval.valid_max_users)
    prompts = [
        rec_prompt(tok, int(u), recent_unique(h, fc.max_items)) for u, h in zip(val["user"], val["history"])
    ]
    lengths = sorted(len(p) for p in prompts)
    bs = cfg.eval.batch_size
    val_tokens = sum(
        lengths[i + min(bs, len(lengths) - i) - 1] * min(bs, len(lengths) - i)
        for i in range(0, len(lengths), bs)
    )
    mid = sorted(prompts, key=len)[len(prompts) // 2 - bs // 2 : len(prompts) // 2 + bs // 2]
    width = max(len(p) for p in mid)
    ids = torch.full((len(mid), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(mid):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    with torch.no_grad():
        _, t_val = _timed(lambda: model.rec_item_log_probs(ids, mask))
    val_per_token = t_val / ids.numel()

    def per_token(key):
        return steps[key]["step_s"] / steps[key]["tokens_through_backbone"]

    tok_epoch = {
        "collab/random": epoch_tokens(random_batches(collab_docs, pc.batch_size), 0),
        "collab/buckets": epoch_tokens(collab_b, 0),
        "collab/buckets+pack128": epoch_tokens(collab_b, 128),
        "content/random": epoch_tokens(random_batches(content_docs, pc.content_batch_size), 0),
        "content/buckets": epoch_tokens(content_b, 0),
        "content/buckets+pack128": epoch_tokens(content_b, 128),
        "rec/random": epoch_tokens(random_batches(rec_docs, fc.batch_size), 0, rec=True),
        "rec/buckets": epoch_tokens(rec_b, 0, rec=True),
    }
    n_collab, n_content, n_rec = len(collab_b), len(content_b), len(rec_b)
    # one pretraining epoch: every collab batch + content_ratio content steps each (the content stream
    # runs n_collab x ratio batches, i.e. that fraction of its own epoch); fine-tuning likewise
    share_pre = pc.content_ratio * n_collab / n_content
    share_fine = fc.content_ratio * n_rec / n_content
    lo = "bf16" if bf16 else "fp32"
    val_s = val_tokens * val_per_token  # measured in the last dtype (bf16 when available)

    def epoch(collab_key, content_key, rec_key, batching, pack_key=None):
        pre = per_token(collab_key) * tok_epoch[f"collab/{pack_key or batching}"]
        pre += share_pre * per_token(content_key) * tok_epoch[f"content/{pack_key or batching}"]
        fine = per_token(rec_key) * tok_epoch[f"rec/{batching}"]
        fine += share_fine * per_token(content_key) * tok_epoch[f"content/{pack_key or batching}"]
        return {"pretrain_epoch_s": round(pre), "finetune_epoch_s": round(fine), "validation_s": round(val_s)}

    epochs = {
        "naive": epoch("collab/fp32", "content/fp32-vocab-head-all-positions", "rec/fp32", "random"),
        "before": epoch("collab/fp32", "content/fp32", "rec/fp32", "random"),
        "after": epoch(f"collab/{lo}", f"content/{lo}", f"rec/{lo}", "buckets"),
        "after+pack": epoch(
            "collab/bf16-packed" if bf16 else "collab/fp32", f"content/{lo}", f"rec/{lo}", "buckets",
            "buckets+pack128",
        ),
    }  # fmt: skip
    epochs["validation_note"] = "forward only, every validation user, sorted by length; measured in " + lo
    report = {
        "command": command,
        "config": CONFIG,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 1, "native_bf16": bf16,
                    "note": "2-core CPU shared with another SmolLM2 job; single measurements, +-20%"},
        "backbone": {"name": cfg.model.backbone, "layers": model.depth, "of": model.full_depth,
                     "vocab": int(model.backbone.get_output_embeddings().weight.shape[0]), "hidden": model.hidden_size},
        "steps": steps,
        "batches_per_epoch": {"collab": n_collab, "content": n_content, "rec": n_rec,
                              "validation_users": len(val)},
        "tokens_per_epoch": tok_epoch,
        "validation": {"seconds_for_32_median_prompts": round(t_val, 3), "tokens_per_pass": val_tokens},
        "epoch_seconds": epochs,
        "profile_seconds": round(time.time() - t_start, 1),
    }  # fmt: skip
    if bf16:
        report["steps"].update(measure_eager(model, tok, cb, tb, rb))
        report["epoch_seconds"]["after+eager"] = eager_epoch(report)
    report["benchmark_estimate"] = benchmark_estimate(report, cfg)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["epoch_seconds"], indent=1))
    for k, v in steps.items():
        print(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
