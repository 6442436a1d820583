"""Validation: avg@K and pass@k per dataset (ALGORITHMS.md §3.3 conventions: K samples per problem at the
evaluation's own temperature/top-p; avg@K = mean accuracy of one sample, pass@k by the unbiased estimator).

Problems are split evenly over data-parallel ranks (contiguous shares; every TP rank of a replica generates the
same samples), verdicts are gathered with ``all_gather_object`` and summarised on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import collectives
from ..config.train import EvalDatasetConfig, TrainConfig
from ..metrics.passk import summarize
from ..metrics.progress import print_table
from ..rollout.base import SamplingParams
from .experience import response_content
from .sources import eval_dataset


@dataclass
class EvalResult:
    metrics: dict[str, float]  # <dataset>/avg@K, <dataset>/pass@k, <dataset>/length_mean (logged with phase "eval")
    rows: list[dict[str, Any]]  # one table row per dataset
    table: str


def _share(items: list, rank: int, world: int) -> list:
    per = -(-len(items) // world)
    return items[rank * per:(rank + 1) * per]


def evaluate(cfg: TrainConfig, *, engine, tokenizer, reward, groups, seed: int, print_enabled: bool = False) -> EvalResult:
    """Run every ``cfg.eval.datasets`` entry through ``engine`` and score it with ``reward`` (a RewardRunner on TP
    rank 0, None elsewhere; verdicts are broadcast over the TP group)."""
    ev = cfg.eval
    params = SamplingParams(temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k, n=ev.k,
                            max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
                            stop_token_ids=tuple(tokenizer.eos_token_ids), seed=seed).validate()
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    dp_rank, dp = groups.dp_rank, groups.dp
    for d in ev.datasets:
        ds = eval_dataset(d, cfg.data, tokenizer)
        records = list(ds)[: d.limit] if d.limit else list(ds)
        mine = _share(records, dp_rank, dp)
        verdicts: list[list[bool]] = []
        lengths: list[int] = []
        if mine:
            samples = engine.generate([r.prompt_ids for r in mine], params)
            lengths = [len(s.response_ids) for s in samples]
            payload = None
            if reward is not None:
                texts = [tokenizer.decode(response_content(s.response_ids, tokenizer.eos_token_ids)) for s in samples]
                # by each sample's prompt: the sglang engine leaves out groups it rejected (docs/sglang_client.md)
                answers = [mine[s.prompt_index].answer for s in samples]
                metas = [dict(mine[s.prompt_index].meta) for s in samples]
                result = reward(texts, answers, metas, lengths)
                payload = [x >= cfg.reward.pass_threshold for x in result.raw]
            if groups.tp > 1:
                payload = collectives.broadcast_object(payload, group=groups.tp_group)
            by_prompt: dict[int, list[bool]] = {}
            for s, verdict in zip(samples, payload, strict=True):
                by_prompt.setdefault(s.prompt_index, []).append(verdict)
            verdicts = [by_prompt[i] for i in sorted(by_prompt)]
        if dp > 1:
            gathered = collectives.all_gather_object((verdicts, lengths), group=groups.dp_group)
            verdicts = [v for part in gathered for v in part[0]]
            lengths = [n for part in gathered for n in part[1]]
        summary = summarize(verdicts, ks=ev.ks, prefix=f"{d.name}/")
        summary[f"{d.name}/length_mean"] = sum(lengths) / max(len(lengths), 1)
        metrics.update(summary)
        rows.append({"dataset": d.name, "problems": len(verdicts),
                     **{k.rsplit("/", 1)[1]: v for k, v in summary.items()}})
    table = print_table(f"evaluation (K={ev.k}, T={ev.temperature}, top_p={ev.top_p})", rows, enabled=print_enabled)
    return EvalResult(metrics, rows, table)


def default_eval_dataset(cfg: TrainConfig) -> EvalDatasetConfig:
    """The training data as an evaluation set (used by ``oar-eval`` when no dataset is configured)."""
    return EvalDatasetConfig(name="train", path=cfg.data.path, layout=cfg.data.layout, prompt_key=cfg.data.prompt_key,
                             answer_key=cfg.data.answer_key)
