"""One tokenizer interface for the trainer: the built-in character tokenizer or a local Hugging Face tokenizer.

``Tokenizer`` wraps either a ``tokenizers.Tokenizer`` (the synthetic task's char tokenizer, built in code) or a
``transformers`` tokenizer loaded from a LOCAL directory (never the network). Its ``encode`` / ``decode`` accept
the keyword arguments that ``oar_megatron.algorithms.segment`` passes (``add_special_tokens``,
``skip_special_tokens``), so the wrapper can be handed to ``split_responses`` / ``build_scoring_batch`` directly.

Prompt ids:
    chat=True:   the chat template rendered to text (it carries its own BOS / role tokens), encoded without specials.
    chat=False:  ``[bos] + encode(text)`` when the tokenizer has a BOS token, else ``encode(text)``.

``transformers`` is imported only when a directory is loaded (it costs seconds to import).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

SYNTHETIC = "synthetic"


class Tokenizer:
    """A tokenizer with the handful of ids and operations the RL loop needs.

    Args:
        backend: a ``tokenizers.Tokenizer`` or a ``transformers.PreTrainedTokenizerBase``.
        eos_token_ids: ids that end a response (EOS and end-of-turn tokens); generation stops at any of them.
        pad_token_id: id used to pad batches (never scored).
        bos_token_id: id prepended to non-chat prompts, or None.
        chat_template: a jinja template string for ``tokenizers`` backends (HF backends use their own), or None.
        name: where it came from, for messages.
    """

    def __init__(
        self,
        backend: Any,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        bos_token_id: int | None = None,
        name: str = "",
    ):
        eos = tuple(int(i) for i in eos_token_ids)
        if not eos:
            raise ValueError(f"tokenizer {name!r}: needs at least one EOS token id")
        self.backend = backend
        self.eos_token_ids: tuple[int, ...] = eos
        self.pad_token_id = int(pad_token_id)
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.name = name
        self._is_hf = not _is_tokenizers_backend(backend)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_ids}, "
                f"pad={self.pad_token_id}, bos={self.bos_token_id})")

    # ----------------------------------------------------------------------------------------------- ids <-> text

    @property
    def vocab_size(self) -> int:
        """Number of real token ids (added/special tokens included; the model's padded vocab may be larger)."""
        if self._is_hf:
            return len(self.backend)
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS unless ``add_special_tokens``."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        try:
            out = self.backend.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # tokenizers raises a bare Exception for characters outside a WordLevel vocab
            raise ValueError(f"tokenizer {self.name!r} cannot encode {text[:80]!r}: {e}") from e
        return [int(i) for i in getattr(out, "ids", out)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens (EOS, ``</think>``, ...) are kept unless ``skip_special_tokens``."""
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def response_text(self, ids: Sequence[int]) -> str:
        """The text a reward sees: the response up to (not including) its first EOS, special tokens dropped."""
        ids = [int(i) for i in ids]
        eos = set(self.eos_token_ids)
        end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        return self.decode(ids[:end], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------------- prompts

    @property
    def has_chat_template(self) -> bool:
        return self._is_hf and bool(getattr(self.backend, "chat_template", None))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` as text."""
        if not self.has_chat_template:
            raise ValueError(f"tokenizer {self.name!r} has no chat template: set chat_template=false for this "
                             f"dataset, or use a tokenizer directory whose tokenizer_config.json has one")
        _check_messages(messages)
        text = self.backend.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False)
        if not isinstance(text, str):  # some versions return a list for a single conversation
            text = text[0]
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template supplies BOS and role tokens itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def render_prompt(self, text_or_messages: str | list[dict], *, system_prompt: str | None = None,
                      chat: bool) -> str:
        """The prompt as text (before the BOS that ``prompt_ids`` adds to non-chat prompts).

        chat=True: a string becomes one user message; ``system_prompt`` becomes a leading system message.
        chat=False: message contents are joined with blank lines; ``system_prompt`` is prepended the same way.
        """
        if isinstance(text_or_messages, str):
            messages = [{"role": "user", "content": text_or_messages}]
        else:
            _check_messages(text_or_messages)
            messages = list(text_or_messages)
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}] + messages
        if chat:
            return self.render_chat(messages, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def prompt_ids(self, text_or_messages: str | list[dict], *, system_prompt: str | None = None,
                   chat: bool) -> list[int]:
        """Token ids of a prompt (see ``render_prompt``); non-chat prompts get ``[bos]`` first when there is one."""
        text = self.render_prompt(text_or_messages, system_prompt=system_prompt, chat=chat)
        return self.ids_of_rendered(text, chat=chat)

    def ids_of_rendered(self, text: str, *, chat: bool) -> list[int]:
        ids = self.encode(text)
        if not chat and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids


def _is_tokenizers_backend(backend: Any) -> bool:
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - tokenizers is a hard dependency
        return False
    return isinstance(backend, tokenizers.Tokenizer)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.120}")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages: every message needs str 'role' and 'content', got {m!r:.120}")


def _generation_eos_ids(path: str) -> list[int]:
    """EOS ids listed in generation_config.json (chat models often stop on an end-of-turn token there)."""
    cfg = os.path.join(path, "generation_config.json")
    if not os.path.isfile(cfg):
        return []
    try:
        with open(cfg) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [i for i in eos if isinstance(i, int)]
    return []


def load_tokenizer(spec: str) -> Tokenizer:
    """``"synthetic"`` → the built-in char tokenizer; otherwise a LOCAL Hugging Face tokenizer directory.

    EOS ids: the tokenizer's eos token plus any ``eos_token_id`` in the directory's generation_config.json.
    Pad: the tokenizer's pad token, else the first EOS id.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer: expected 'synthetic' or a local tokenizer directory, got {spec!r}")
    if spec == SYNTHETIC:
        from .synthetic import char_tokenizer
        return char_tokenizer()
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer: {spec!r} is neither 'synthetic' nor an existing local directory "
                         f"(tokenizers are never downloaded; point at a directory with tokenizer.json)")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load a Hugging Face tokenizer from {path!r}: {e}") from e
    eos = []
    if hf.eos_token_id is not None:
        eos.append(int(hf.eos_token_id))
    eos += [i for i in _generation_eos_ids(path) if i not in eos]
    if not eos:
        raise ValueError(f"tokenizer: {path!r} defines no eos_token (tokenizer_config.json or generation_config.json)")
    pad = hf.pad_token_id if hf.pad_token_id is not None else eos[0]
    return Tokenizer(hf, eos_token_ids=eos, pad_token_id=pad, bos_token_id=hf.bos_token_id, name=path)
