"""The public numerics API (see docs/algorithms.md and the project spec API.md).

Pure torch: nothing here imports Megatron or Hydra. Functions that reduce across ranks take a process group
argument (``None`` = no communication). Bad input raises ``ValueError`` naming the argument.
"""

# Each module adds its public names below (one import line per module).
from .advantages import (  # noqa: F401
    GroupFilter, advantage_estimators, compute_advantages, filter_groups, get_advantage_estimator,
    group_advantages, register_advantage_estimator, whiten,
)
from .losses import (  # noqa: F401
    AGG_MODES, KL_KINDS, PolicyLossConfig, aggregate_loss, entropy_bonus, kl_loss, kl_penalty, policy_loss,
    policy_losses, register_policy_loss,
)
from .reduce import all_reduce, group_size, loss_denominators, masked_mean, masked_sum  # noqa: F401
from .rollout_correction import rollout_correction  # noqa: F401
from .logprob import reference_logprob_entropy, vocab_parallel_kl, vocab_parallel_logprob_entropy  # noqa: F401
from .oar import (  # noqa: F401
    advantage_shapers, credit_metrics, get_advantage_shaper, oar_weights, register_advantage_shaper, shape_advantages,
)
from .segment import (  # noqa: F401
    DEFAULT_ANSWER_MARKERS, DEFAULT_CONCLUDE, ResponseSplit, ScoringBatch, build_scoring_batch, decode_ids,
    encode_text, extract_boxed, score_mask_from_splits, scoring_batch_from_responses, split_response, split_responses,
)
from .saliency import PFINAL_MODES, Saliency, local_kl, oar_g_saliency, oar_p_saliency  # noqa: F401
from .context_parallel import (  # noqa: F401
    gather_zigzag, seq_mean_over_cp, seq_sum_over_cp, zigzag_indices, zigzag_split,
)
