"""Prompt datasets (JSONL / Parquet / the synthetic task) and a deterministic, resumable batch iterator.

Rows are read from a file, their prompt and answer fields picked by (dotted) key, and each prompt tokenised once.
Bad rows are skipped and counted, never fatal: ``dataset.skipped`` holds ``(row_number, reason)`` with 1-based row
numbers (the JSONL line number; the Parquet row index + 1), and ``dataset.summary()`` names the first few. A file
with no usable row is a ValueError naming the file.

Layouts (presets for keys and answer extraction; explicit ``prompt_key`` / ``answer_key`` override them):

    None        prompt / answer; the answer is used as is (str, or a number turned into str)
    gsm8k       question / answer; the final answer after the last ``####``, commas removed
    math        problem / solution; the contents of the last ``\\boxed{}``
    dapo_math   prompt (a list of chat messages) / reward_model.ground_truth

``PromptIterator`` draws global batches from a per-epoch permutation seeded with ``seed + epoch``; its state is two
ints, so a resumed run continues with exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..algorithms.segment import extract_boxed
from .tokenizer import Tokenizer

LAYOUTS: dict[str | None, tuple[str, str]] = {
    None: ("prompt", "answer"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "dapo_math": ("prompt", "reward_model.ground_truth"),
}


@dataclass
class PromptRecord:
    """One prompt. index: position in the dataset; meta: passed to the reward function as keyword arguments."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    meta: dict = field(default_factory=dict)


class _BadRow(Exception):
    pass


def _get_path(row: Any, key: str) -> Any:
    cur = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise _BadRow(f"missing key {key!r}")
        cur = cur[part]
    return cur


def _as_answer(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(f"{key!r} is a {type(value).__name__}, expected a str or a number")
    text = value.strip() if isinstance(value, str) else str(value)
    if not text:
        raise _BadRow(f"{key!r} is empty")
    return text


def _gsm8k_answer(text: str) -> str:
    if "####" not in text:
        raise _BadRow("no '####' final answer in the solution")
    out = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not out:
        raise _BadRow("empty final answer after '####'")
    return out


def _math_answer(text: str) -> str:
    out = extract_boxed(text)
    if out is None or not out.strip():
        raise _BadRow("no \\boxed{} answer in the solution")
    return out.strip()


_EXTRACT: dict[str | None, Callable[[str], str]] = {
    None: lambda s: s, "gsm8k": _gsm8k_answer, "math": _math_answer, "dapo_math": lambda s: s,
}


def _as_prompt(value: Any, key: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"{key!r} is empty")
        return value
    if isinstance(value, (list, tuple)):  # chat messages (Parquet gives lists of dicts; numpy arrays are lists here)
        msgs = list(value)
        if not msgs:
            raise _BadRow(f"{key!r} is an empty message list")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _BadRow(f"{key!r}: every message needs str 'role' and 'content'")
        if not any(m["content"].strip() for m in msgs):
            raise _BadRow(f"{key!r}: all messages are empty")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise _BadRow(f"{key!r} is a {type(value).__name__}, expected a str or a list of chat messages")


def _apply_template(prompt: str | list[dict], template: str | None) -> str | list[dict]:
    if template is None:
        return prompt
    if isinstance(prompt, str):
        return template.format(prompt=prompt)
    # messages: template the last user message
    out = [dict(m) for m in prompt]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = template.format(prompt=m["content"])
            break
    return out


def _read_rows(path: str) -> list[tuple[int, Any]]:
    """(row_number, row or _BadRow) for each row of a .jsonl / .parquet file; row numbers are 1-based."""
    if path.endswith(".jsonl") or path.endswith(".json"):
        out: list[tuple[int, Any]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((n, _BadRow(f"invalid JSON ({e.msg})")))
        return out
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise ValueError(f"dataset {path!r}: expected a .jsonl or .parquet file")


class PromptDataset:
    """Tokenised prompts with their reference answers. ``records[i].index == i``."""

    def __init__(self, records: list[PromptRecord], *, name: str, skipped: list[tuple[int, str]] | None = None,
                 source: str = ""):
        self.records = records
        self.name = name
        self.skipped: list[tuple[int, str]] = list(skipped or [])
        self.source = source or name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def summary(self, first: int = 3) -> str:
        """One line: prompts kept, rows skipped, and the first few bad rows with their reason."""
        line = f"{self.name}: {len(self.records)} prompts"
        if self.skipped:
            named = "; ".join(f"row {n}: {why}" for n, why in self.skipped[:first])
            more = f"; ... {len(self.skipped) - first} more" if len(self.skipped) > first else ""
            line += f", {len(self.skipped)} rows skipped ({named}{more})"
        return line

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[tuple[int, Any]] | Sequence[dict],
        *,
        tokenizer: Tokenizer,
        prompt_key: str | None = None,
        answer_key: str | None = None,
        layout: str | None = None,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        chat_template: bool = False,
        max_prompt_tokens: int | None = None,
        name: str = "prompts",
        meta_keys: Sequence[str] = (),
    ) -> PromptDataset:
        """Build from rows (dicts, or (row_number, dict) pairs). See ``from_file`` for the arguments."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(k for k in LAYOUTS if k)} or None, got {layout!r}")
        if prompt_template is not None:
            try:
                prompt_template.format(prompt="x")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"prompt_template: must be a str.format template using only {{prompt}}: {e!r}")
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens: expected a positive int or None, got {max_prompt_tokens!r}")
        if chat_template and not tokenizer.has_chat_template:  # a config error, not a bad row
            tokenizer.render_chat([{"role": "user", "content": ""}])  # raises the tokenizer's clear ValueError
        pkey = prompt_key or LAYOUTS[layout][0]
        akey = answer_key or LAYOUTS[layout][1]
        extract = _EXTRACT[layout]
        records: list[PromptRecord] = []
        skipped: list[tuple[int, str]] = []
        numbered = [r if isinstance(r, tuple) else (n, r) for n, r in enumerate(rows, start=1)]
        for n, row in numbered:
            try:
                if isinstance(row, _BadRow):
                    raise row
                if not isinstance(row, dict):
                    raise _BadRow(f"row is a {type(row).__name__}, expected an object")
                prompt = _apply_template(_as_prompt(_get_path(row, pkey), pkey), prompt_template)
                answer = extract(_as_answer(_get_path(row, akey), akey))
                text = tokenizer.render_prompt(prompt, system_prompt=system_prompt, chat=chat_template)
                ids = tokenizer.ids_of_rendered(text, chat=chat_template)
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    raise _BadRow(f"prompt has {len(ids)} tokens > max_prompt_tokens={max_prompt_tokens}")
            except _BadRow as e:
                skipped.append((n, str(e)))
                continue
            except ValueError as e:  # the tokenizer could not encode the text, or a template rejected the messages
                skipped.append((n, str(e)))
                continue
            meta = {"dataset": name, "row": n}
            meta.update({k: row[k] for k in meta_keys if k in row})
            records.append(PromptRecord(len(records), ids, text, answer, meta))
        ds = cls(records, name=name, skipped=skipped)
        if not records:
            raise ValueError(f"dataset {name!r}: no usable rows ({ds.summary()})")
        return ds

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        tokenizer: Tokenizer,
        prompt_key: str | None = None,
        answer_key: str | None = None,
        layout: str | None = None,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        chat_template: bool = False,
        max_prompt_tokens: int | None = None,
        name: str | None = None,
    ) -> PromptDataset:
        """Load a ``.jsonl`` or ``.parquet`` prompt file.

        Args:
            path: the file.
            tokenizer: a ``Tokenizer`` (``load_tokenizer``).
            prompt_key, answer_key: dotted paths into each row (``reward_model.ground_truth``); default from layout.
            layout: None, "gsm8k", "math" or "dapo_math" (module docstring).
            prompt_template: ``str.format`` template with ``{prompt}`` applied to the prompt text (for chat prompts,
                to the last user message), e.g. ``"{prompt}\\nPut the final answer in \\\\boxed{{}}."``.
            system_prompt: a system message (chat) or a leading paragraph (no chat).
            chat_template: render the prompt with the tokenizer's chat template.
            max_prompt_tokens: longer prompts are skipped.
            name: the dataset's name in metrics; default the file name without extension.
        """
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ValueError(f"dataset: {path!r} is not a file")
        if name is None:
            name = os.path.splitext(os.path.basename(path))[0]
        rows = _read_rows(path)
        if not rows:
            raise ValueError(f"dataset {path!r}: the file has no rows")
        ds = cls.from_rows(
            rows, tokenizer=tokenizer, prompt_key=prompt_key, answer_key=answer_key, layout=layout,
            prompt_template=prompt_template, system_prompt=system_prompt, chat_template=chat_template,
            max_prompt_tokens=max_prompt_tokens, name=name,
        )
        ds.source = path
        return ds

    @classmethod
    def from_synthetic(cls, task, tokenizer: Tokenizer | None = None, *, name: str | None = None) -> PromptDataset:
        """A built-in task's rows (``SyntheticTask.rows()``, ``PivotTask.rows()``) as a dataset; meta carries the
        row's other keys (modsum: ``a`` and ``b``)."""
        rows = task.rows()
        meta_keys = tuple(k for k in rows[0] if k not in ("prompt", "answer")) if rows else ()
        return cls.from_rows(rows, tokenizer=tokenizer or task.tokenizer, name=name or task.name,
                             meta_keys=meta_keys)


class PromptIterator:
    """Global batches of prompts, reshuffled every epoch, resumable from two ints.

    Epoch e visits the dataset in the order ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``
    (identity order when ``shuffle=False``). Batches are always ``batch_size`` records:

        drop_last=True   the tail of an epoch shorter than a batch is dropped; the next batch starts a new epoch.
        drop_last=False  the tail is completed with the first records of the next epoch's order.

    ``shard(rank, world)`` returns an iterator (same state) whose ``next_batch`` gives rank its contiguous
    ``batch_size // world`` slice of each global batch; every rank draws the same global batches.
    """

    def __init__(self, dataset: Sequence[PromptRecord], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        n = len(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if n == 0:
            raise ValueError("dataset: empty")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size={batch_size} > {n} prompts with drop_last=True: no batch can be drawn")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # records of the current epoch's order already drawn
        self._order_epoch = -1
        self._order: list[int] = []
        self._rank, self._world = 0, 1

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> list[PromptRecord]:
        """The next ``batch_size`` records (all ranks' shares)."""
        n = len(self.dataset)
        if self.drop_last and self.position + self.batch_size > n:
            self.epoch, self.position = self.epoch + 1, 0
        idx: list[int] = []
        while len(idx) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(idx), n - self.position)
            idx += order[self.position:self.position + take]
            self.position += take
            if self.position >= n:
                self.epoch, self.position = self.epoch + 1, 0
        return [self.dataset[i] for i in idx]

    def next_batch(self) -> list[PromptRecord]:
        """The next global batch, or this rank's contiguous share of it after ``shard``."""
        batch = self.next_global_batch()
        if self._world == 1:
            return batch
        per = self.batch_size // self._world
        return batch[self._rank * per:(self._rank + 1) * per]

    def shard(self, rank: int, world: int) -> PromptIterator:
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"shard: expected 0 <= rank < world, got rank={rank!r} world={world!r}")
        if self.batch_size % world:
            raise ValueError(f"shard: batch_size={self.batch_size} is not divisible by world={world}")
        out = copy.copy(self)
        out._order = list(self._order)
        out._rank, out._world = rank, world
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable state; ``seed``, ``batch_size`` and ``num_prompts`` are checked on load."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("num_prompts", len(self.dataset))):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"PromptIterator.load_state_dict: saved {key}={state[key]} but this iterator has "
                                 f"{key}={mine}; the resumed batches would differ from the original run's")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
