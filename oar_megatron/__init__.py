"""oar_megatron: a megatron-core RL trainer for reasoning LLMs with outcome-grounded token credit assignment.

Subpackages:
  algorithms  pure-torch numerics (advantages, policy losses, KL, rollout correction, OAR, vocab-parallel log-probs);
              no Megatron imports; process groups are passed in.
  compat      the small CPU-compatibility layer that lets real megatron-core run under gloo without CUDA.
"""

__version__ = "0.1.0"
