"""Lazy reading of an HF safetensors checkpoint (one file or sharded with ``model.safetensors.index.json``):
tensors are opened with ``safe_open`` and read one at a time, so memory stays near the largest tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["SafetensorsReader"]


class SafetensorsReader:
    """``names()`` lists every tensor; ``get(name)`` reads one; ``shape(name)`` without reading it. Files are opened
    on first use and kept open (memory-mapped, nothing read until ``get``); ``close()`` or ``with`` releases them."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self._open = safe_open
        root = Path(directory)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"safetensors: {index} is not a safetensors index (no weight_map)") from None
            self._where = {name: root / file for name, file in weight_map.items()}
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise ValueError(f"safetensors: no *.safetensors files in {root}")
            self._where = {}
            for file in files:
                with self._safe(file) as f:
                    for name in f.keys():
                        self._where[name] = file
        self._handles: dict[Path, object] = {}

    def _safe(self, file: Path):
        if not file.is_file():
            raise ValueError(f"safetensors: missing file {file}")
        try:
            return self._open(str(file), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"safetensors: cannot read {file}: {exc}") from None

    def _handle(self, name: str):
        file = self._where[name]
        if file not in self._handles:
            self._handles[file] = self._safe(file).__enter__()
        return self._handles[file]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)
