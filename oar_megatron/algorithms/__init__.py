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
