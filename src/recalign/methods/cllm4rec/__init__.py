"""CLLM4Rec (Zhu et al., WWW 2024): user/item ID tokens on a frozen LM, collaborative + content LMs with
mutual regularisation, and an item head trained with a multinomial likelihood over held-out items.

Modules: :mod:`.vocab` (ID tokenizer), :mod:`.model` (tables, heads, losses), :mod:`.documents`
(documents, masking, batching), :mod:`.training` (alternating stages), :mod:`.checkpoint`,
:mod:`.recommender` (inference + Recommender adapter), :mod:`.protocol` (hold-out evaluation),
:mod:`.pipeline` (what the CLI runs).
"""

from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.model import CLLM4RecModel
from recalign.methods.cllm4rec.recommender import CLLM4RecRecommender, build_model
from recalign.methods.cllm4rec.vocab import IDTokenizer

__all__ = ["CLLM4RecConfig", "CLLM4RecModel", "CLLM4RecRecommender", "IDTokenizer", "build_model"]
