"""Metrics of the RL loop: the JSONL/TensorBoard/W&B logger, terminal progress, avg@K and pass@k.

Plain Python plus rich (and torch only for the optional TensorBoard writer); no Megatron or Hydra imports.
"""

from oar_megatron.metrics.logger import METRICS_FILE, MetricsLogger, flatten_metrics, read_metrics, truncate_metrics
from oar_megatron.metrics.passk import avg_at_k, default_ks, pass_at_k, summarize
from oar_megatron.metrics.progress import STEP_LINE_KEYS, Progress, format_step_line, print_table

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "flatten_metrics",
    "read_metrics",
    "truncate_metrics",
    "avg_at_k",
    "default_ks",
    "pass_at_k",
    "summarize",
    "STEP_LINE_KEYS",
    "Progress",
    "format_step_line",
    "print_table",
]
