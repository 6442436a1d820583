"""Config → the loop's inputs: tokenizer, prompt datasets and iterator, reward. One place that knows how the
``data`` / ``reward`` / ``eval`` config groups map onto ``oar_megatron.data`` and ``oar_megatron.rewards``."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..config.train import DataConfig, EvalDatasetConfig, RewardConfig
from ..data.prompts import PromptDataset, PromptIterator
from ..data.pivot import PivotTask
from ..data.synthetic import SyntheticTask
from ..data.tokenizer import Tokenizer, load_tokenizer


def build_tokenizer(data: DataConfig) -> Tokenizer:
    return load_tokenizer(data.tokenizer)


def synthetic_task(data: DataConfig, *, size: int | None = None, seed: int | None = None) -> SyntheticTask | PivotTask:
    """The built-in task ``data.synthetic.task`` names (modsum or pivot)."""
    s = data.synthetic
    seed = data.seed if seed is None else seed
    if s.task == "pivot":
        return PivotTask(base=s.base, pivots=s.pivots, filler_len=s.filler_len, size=size or s.size, seed=seed)
    return SyntheticTask(base=s.base, reasoning_len=s.reasoning_len, size=size or s.size, seed=seed)


def build_dataset(data: DataConfig, tokenizer: Tokenizer) -> PromptDataset:
    """The training prompts; bad rows are skipped, counted and named in one printed line."""
    if data.path == "synthetic":
        return PromptDataset.from_synthetic(synthetic_task(data), tokenizer)
    ds = PromptDataset.from_file(data.path, tokenizer=tokenizer, prompt_key=data.prompt_key,
                                 answer_key=data.answer_key, layout=data.layout,
                                 prompt_template=data.prompt_template, system_prompt=data.system_prompt,
                                 chat_template=data.chat_template, max_prompt_tokens=data.max_prompt_tokens)
    if ds.skipped:
        print(f"data: {ds.summary()}", flush=True)
    return ds


def eval_dataset(d: EvalDatasetConfig, data: DataConfig, tokenizer: Tokenizer) -> PromptDataset:
    """An evaluation set: the synthetic task with its own seed (distinct draws from training), or a file read
    with the training data's template and chat settings."""
    if d.path == "synthetic":
        task = synthetic_task(data, size=d.limit or 64, seed=data.seed + 10_007)
        return PromptDataset.from_synthetic(task, tokenizer, name=d.name)
    return PromptDataset.from_file(d.path, tokenizer=tokenizer, prompt_key=d.prompt_key, answer_key=d.answer_key,
                                   layout=d.layout, prompt_template=data.prompt_template,
                                   system_prompt=data.system_prompt, chat_template=data.chat_template,
                                   max_prompt_tokens=data.max_prompt_tokens, name=d.name)


def iterator_for(dataset: PromptDataset, batch_size: int, data: DataConfig) -> PromptIterator:
    if batch_size > len(dataset):
        raise ValueError(f"rollout.prompts_per_step: {batch_size} is larger than the dataset ({len(dataset)} prompts)")
    return PromptIterator(dataset, batch_size=batch_size, seed=data.seed, shuffle=data.shuffle)


class Scored(NamedTuple):
    scores: list[float]  # the training reward (overlong shaping included)
    raw: list[float]  # the verifier's score (pass/fail is judged on this)
    stats: dict[str, float]


class Rewarder:
    """The configured reward over a batch of decoded responses (``oar_megatron.rewards.RewardRunner``)."""

    def __init__(self, cfg: RewardConfig, max_new_tokens: int) -> None:
        from ..rewards import RewardRunner

        o = cfg.overlong
        overlong = None
        if o.enabled:
            overlong = {"max_len": o.max_len or max_new_tokens, "cache_len": o.cache_len, "factor": o.factor}
        self.runner = RewardRunner(cfg.fn, timeout_s=cfg.timeout_s, isolated=cfg.isolated,
                                   num_workers=cfg.num_workers, overlong=overlong)

    def __call__(self, texts: list[str], answers: list[str], metas: list[dict[str, Any]],
                 lengths: list[int]) -> Scored:
        scores, stats = self.runner(texts, answers, metas, lengths)
        raw = list(self.runner.last_verifier_scores)
        keep = ("reward/timeouts", "reward/errors", "reward/overlong_frac", "reward/overlong_penalty_mean")
        return Scored(scores, raw, {k: v for k, v in stats.items() if k in keep})

    def close(self) -> None:
        self.runner.close()


def build_reward(cfg: RewardConfig, max_new_tokens: int) -> Rewarder:
    return Rewarder(cfg, max_new_tokens)
