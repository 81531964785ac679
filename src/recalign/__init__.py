"""recalign: language models as recommenders, aligned with recommendation knowledge and preferences.

The package is layered so that every method sees the same data and the same evaluation:

- ``recalign.data``: loaders for the common recommendation formats, preprocessing, the ``loo`` and
  ``llara`` splits and the seeded candidate sets that every method (classical or LM) is scored on.
- ``recalign.evaluation``: metrics, protocols (candidate ranking, full ranking, generation), result
  records and comparison reports.
- ``recalign.baselines``: popularity, BPR-MF, SASRec, GRU4Rec.
- ``recalign.lm``: model loading (including the embedded SmolLM2), prompts, shared-prefix scoring.
- ``recalign.objectives``: the losses (SFT, DPO, S-DPO, DMPO, ...) as small pure functions.
- ``recalign.methods``: the training recipes built from the pieces above.
- the ``cli`` subpackage: the ``recalign`` command, argparse over the above (no library module imports it).
"""

from recalign.errors import RecalignInputError

__version__ = "0.1.0"
__all__ = ["RecalignInputError", "__version__"]
