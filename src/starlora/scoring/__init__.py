"""Uncertainty of (prompt, answer) pairs: predictive entropy (PE) and maximum entropy (ME).

For one example with answer tokens ``a_1..a_n`` teacher-forced after its prompt:

* **PE** = sum_i -log p(a_i | prompt, a_<i)   (nats; the answer's negative log-likelihood)
* **ME** = sum_i H(p(. | prompt, a_<i))       (nats; full-vocabulary entropy, summed over the
  answer positions: the paper's "maximum entropy" measure, a sum, not a mean)

`Scores` also carries their per-token means (``pe_per_token``, ``me_per_token``) and, with MC
dropout, the per-pass values. The answer is the gold one (``Task.encode``) or given token ids,
e.g. the model's own generation (`score_own_answers`).

Modules, bottom to top: `results` (the schema), `batching`, `measures` (the tiled LM-head
kernel), `packing` and `lora_fastpath` (speed: packed rows, a fused peft forward, MC masks),
`reference` (the plain definition the fast path is checked against), `cache` (base results on
disk, keyed by content), `engine` (`score_examples`), `base_scores` (`score_base`: the frozen
base model, cached records computed in fixed shapes), `own_answers`
(`own_answers`, `score_generated`, `score_own_answers`, `base_answers`,
`score_base_answers`: label-free, the first pass measured while generating), `consistency` (`answer_entropy`,
`agreement`: self-consistency of sampled final answers).
"""

from starlora.scoring.base_scores import score_base
from starlora.scoring.cache import (
    BaseScoreCache,
    base_cache_key,
    default_score_cache_dir,
    sequence_key,
)
from starlora.scoring.engine import score_examples
from starlora.scoring.options import ScoringOptions
from starlora.scoring.own_answers import (
    BaseAnswers,
    base_answers,
    own_answers,
    score_base_answers,
    score_generated,
    score_own_answers,
)
from starlora.scoring.results import MEASURES, Scores

__all__ = [
    "MEASURES", "BaseAnswers", "BaseScoreCache", "Scores", "ScoringOptions", "base_answers",
    "base_cache_key", "default_score_cache_dir", "own_answers", "score_base",
    "score_base_answers", "score_examples", "score_generated", "score_own_answers",
    "sequence_key",
]
