"""Training checkpoints (megatron dist-checkpointing, atomic, keep-last-k): see :mod:`.manager`.

Importing this package does not import megatron; ``CheckpointManager.save``/``load`` do."""

from .manager import (FAULT_EXIT_CODE, CheckpointError, CheckpointManager, list_checkpoints, load_model_weights,
                      read_latest, resolve_checkpoint)

__all__ = ["FAULT_EXIT_CODE", "CheckpointError", "CheckpointManager", "list_checkpoints", "load_model_weights",
           "read_latest", "resolve_checkpoint"]
