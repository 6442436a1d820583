"""Training checkpoints (megatron dist-checkpointing, atomic, keep-last-k): see :mod:`.manager`.

Importing this package does not import megatron; ``CheckpointManager.save``/``load`` do."""

from .manager import FAULT_EXIT_CODE, CheckpointError, CheckpointManager, list_checkpoints, read_latest

__all__ = ["FAULT_EXIT_CODE", "CheckpointError", "CheckpointManager", "list_checkpoints", "read_latest"]
