"""The megatron-core policy: the only package that imports ``megatron.core`` (lazily, inside functions, so importing
``oar_megatron.policy`` stays cheap and works where only the config layer is needed)."""

from .model import (  # noqa: F401
    MissingDependencyError,
    build_model,
    check_model_environment,
    layer_spec,
    transformer_config,
)
from .parallel import ParallelGroups, RankEnv, destroy_parallel, init_parallel, rank_env  # noqa: F401
