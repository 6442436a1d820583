"""An engine shared by the ranks of one model replica: only the replica's first rank (tensor-, pipeline- and
context-parallel rank 0) asks the remote engine; the samples (or its one-line error) are broadcast to the replica's
other ranks, which must all train on the same rows. Used for the SGLang engine (the local engine generates on every
TP rank itself, with the same seed). ``sync_weights`` is collective over every trainer rank (the inner engine's own
contract), and every rank keeps the same ``weight_version``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .base import RolloutEngine, Sample, SamplingParams

__all__ = ["ReplicaEngine"]


class ReplicaEngine(RolloutEngine):
    def __init__(self, inner: RolloutEngine, groups: Any):
        from .. import collectives

        self.inner = inner
        self.groups = groups
        self._groups = [grp for grp in (groups.mp_group, groups.cp_group)
                        if grp is not None and groups.world_size > 1 and collectives.size(grp) > 1]
        self.leader = all(collectives.rank(grp) == 0 for grp in self._groups)
        self.last_stats: dict[str, float] = {}

    @property
    def weight_version(self) -> int:  # type: ignore[override]
        return self.inner.weight_version

    @property
    def last_sync_stats(self) -> dict[str, float]:
        return getattr(self.inner, "last_sync_stats", {})

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        from .. import collectives
        from .sglang import RolloutError

        payload: Any = None
        if self.leader:
            try:
                payload = ("ok", self.inner.generate(prompts, params), dict(getattr(self.inner, "last_stats", {})))
            except (RolloutError, RuntimeError, ValueError) as exc:
                if not self._groups:
                    raise
                payload = ("error", f"{type(exc).__name__}: {exc}", {})
        for grp in self._groups:  # mp group first (its rank 0 is the leader), then cp
            payload = collectives.broadcast_object(payload, group=grp)
        kind, value, stats = payload
        if kind == "error":
            raise RolloutError(value)
        self.last_stats = stats
        return value

    def stream_groups(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                      ) -> Iterator[list[tuple[int, list[Sample]]]]:
        """The inner engine's batches of finished groups on the leader, each broadcast to the replica's other ranks
        as it arrives (one broadcast per batch, then one for the end: every rank of the replica sees the same
        batches, so their collective passes on them match)."""
        from .. import collectives
        from .sglang import RolloutError

        if not self._groups:
            yield from self.inner.stream_groups(prompts, params)
            self.last_stats = dict(getattr(self.inner, "last_stats", {}))
            return
        source = iter(self.inner.stream_groups(prompts, params)) if self.leader else None
        while True:
            message: Any = None
            if self.leader:
                try:
                    message = ("batch", next(source), None)
                except StopIteration:
                    message = ("done", None, dict(getattr(self.inner, "last_stats", {})))
                except (RolloutError, RuntimeError, ValueError) as exc:
                    message = ("error", f"{type(exc).__name__}: {exc}", None)
            for grp in self._groups:  # mp group first (its rank 0 is the leader), then cp
                message = collectives.broadcast_object(message, group=grp)
            kind, value, stats = message
            if kind == "error":
                raise RolloutError(value)
            if kind == "done":
                self.last_stats = stats
                return
            yield value

    def check_servers(self) -> None:
        """The inner engine's ``check_servers`` on global rank 0; its error raised on every rank."""
        from .. import collectives
        from .sglang import RolloutError

        error = None
        if self.groups.rank == 0:
            try:
                self.inner.check_servers()
            except RolloutError as exc:
                error = str(exc)
        if self.groups.world_size > 1:
            error = collectives.broadcast_object(error)
        if error is not None:
            raise RolloutError(error)

    def start_local_servers(self, actor: Any, *, wait: bool = True) -> None:
        self.inner.start_local_servers(actor, wait=wait)

    def wait_local_servers(self) -> None:
        self.inner.wait_local_servers()

    def sync_weights(self, source: Any = None) -> None:
        self.inner.sync_weights(source)

    def close(self) -> None:
        self.inner.close()

    def state_dict(self) -> dict[str, int]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.inner.load_state_dict(state)
