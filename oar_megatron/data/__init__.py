"""Prompt data for the RL loop: tokenizers, prompt datasets and their iterator, the built-in synthetic task.

Pure Python / torch: no Megatron or Hydra imports.
"""

from .prompts import LAYOUTS, PromptDataset, PromptIterator, PromptRecord  # noqa: F401
from .synthetic import SyntheticTask, char_tokenizer  # noqa: F401
from .tokenizer import Tokenizer, load_tokenizer  # noqa: F401
