"""The public numerics API (see docs/algorithms.md and the project spec API.md).

Pure torch: nothing here imports Megatron or Hydra. Functions that reduce across ranks take a process group
argument (``None`` = no communication). Bad input raises ``ValueError`` naming the argument.
"""

# Each module adds its public names below (one import line per module).
