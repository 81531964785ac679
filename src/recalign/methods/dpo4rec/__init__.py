"""DPO4Rec (Sun et al.): preference summaries judged by a knowledge-augmented recommender, turned into DPO pairs.

The pipeline, one module per step:

1. :mod:`~recalign.methods.dpo4rec.summaries` -- the LM reads a user's history and writes short summaries
   of their tastes (N sampled per user, seeded, batched, resumable).
2. :mod:`~recalign.methods.dpo4rec.encoder` -- all-MiniLM-L6-v2 (or a hashing stand-in for tests) embeds
   each summary.
3. :mod:`~recalign.methods.dpo4rec.fusion` -- SASRec whose user representation is fused with the
   summary embedding, trained on (history, summary) -> next item.
4. :mod:`~recalign.methods.dpo4rec.reward` -- a summary's reward is the NDCG@K of the true next item among
   the candidates as re-ranked by the augmented recommender given that summary.
5. :mod:`~recalign.methods.dpo4rec.pairs` -- best and worst of a user's N summaries form a DPO pair
   (ties counted, not paired).
6. :mod:`~recalign.methods.dpo4rec.recipe` -- the whole run as a list of named stages (``STAGES``: data,
   sasrec, summaries, fusion, iterations, test) over one ``RunState``; the stage bodies (written atomically
   and skipped when complete, DPO with LoRA and an adapter-disabled or cached reference) are in
   :mod:`~recalign.methods.dpo4rec.stages`, the evaluation of SASRec alone and with unaligned / aligned
   summaries on the same test users and the written metrics/records in :mod:`~recalign.methods.dpo4rec.report`.
"""
