"""The RL loop (``oar-train``): config → plan → Trainer (rollout → reward → advantage → saliency → reshape → loss →
update → sync → metrics → checkpoint) and evaluation (``oar-eval``)."""

from .compose import compose_config  # noqa: F401
