"""The ``oar-train`` application config: one typed schema for every config group (``configs/config.yaml`` is its
default instance, Hydra composes the groups onto it).

Groups: ``model`` (:class:`ModelConfig`), ``parallel`` (:class:`ParallelConfig`), ``algorithm``
(:class:`AlgorithmConfig`), ``optim`` (:class:`OptimConfig`), ``rollout``, ``data``, ``reward``, ``eval``, ``trainer``,
``checkpoint``, ``logging`` (this module). :meth:`TrainConfig.validate` checks everything that can be checked
without process groups — each group's own validation plus the batch arithmetic across groups — and raises one
``ValueError`` naming the key, so a bad config fails before any worker starts.

Batch arithmetic (one RL step)::

    rows            = rollout.prompts_per_step · rollout.n_samples            (global, over data-parallel ranks)
    rows_per_rank   = rows / dp                                                (prompts split evenly: a group stays on one rank)
    micro_batches   = rows_per_rank / trainer.micro_batch_size
    mini_batches    = algorithm.updates_per_batch  (micro_batches split evenly: one optimizer step each)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..algorithms.advantages import advantage_estimators
from ..algorithms.losses import AGG_MODES, KL_KINDS, policy_losses
from ..algorithms.rollout_correction import CORRECTION_LEVELS, CORRECTION_MODES
from . import model as _model
from .algorithm import PFINAL_MODES, SALIENCY_METHODS, SHAPERS, AlgorithmConfig
from .model import ModelConfig
from .optim import LR_DECAY_STYLES, OptimConfig, resolve_precision
from .parallel import ORDERS, ParallelConfig, ParallelLayout

ROLLOUT_ENGINES = ("local", "sglang")
SYNTHETIC_TASKS = ("modsum", "pivot")
SGLANG_TIMEOUT_S = 600.0  # rollout.timeout_s default for the sglang engine
RESUME_MODES = ("auto", "never")
WEIGHT_SYNC_MODES = ("disk", "distributed")
DATA_LAYOUTS = ("gsm8k", "math", "dapo_math")
RECOMPUTE_MODES = ("selective", "full")
TENSORBOARD_MODES = ("auto", "true", "false")


@dataclass(kw_only=True)
class RolloutConfig:
    engine: str = "local"  # local (in-process, the trainer's own weights) | sglang (SGLang servers over HTTP)
    prompts_per_step: int = 16  # global, over data-parallel ranks
    n_samples: int = 8  # responses per prompt (the GRPO group size)
    temperature: float = 1.0  # sampling temperature (> 0: the policy gradient is taken under it)
    top_p: float = 1.0  # nucleus sampling (1: off)
    top_k: int = -1  # top-k sampling (-1: off)
    max_new_tokens: int = 16  # longest response
    max_batch_size: int = 64  # local engine: rows decoded together
    max_gen_batches: int = 3  # generation rounds per step (dynamic sampling; replacing groups sglang rejected)
    # The SGLang client (engine: sglang; docs/sglang_client.md). Validation refuses these with the local engine, so
    # none is ever silently ignored.
    server_urls: list[str] = field(default_factory=list)  # sglang workers: generation (unless router_url) + weight sync
    router_url: str | None = None  # sglang-router in front of the workers: generation goes through it
    api_key: str | None = None  # sent as "Authorization: Bearer <key>" (the servers' --api-key)
    timeout_s: float | None = None  # sglang: per-request timeout in seconds (None: SGLANG_TIMEOUT_S)
    update_timeout_s: float | None = None  # sglang: per-worker weight-update timeout (None: SGLANG_TIMEOUT_S)
    max_concurrency: int | None = None  # sglang: requests in flight per data-parallel rank (None: SGLANG_CONCURRENCY)
    max_retries: int | None = None  # sglang: retries per sample after a failed / invalid response (None: 3)
    min_valid_frac: float | None = None  # sglang: fail the step when fewer of a call's groups are valid (None: 0.5)
    weight_sync: str | None = None  # sglang: disk (export + /update_weights_from_disk; None: disk) | distributed
    sync_dir: str | None = None  # sglang: where weight versions are written (None: <run_dir>/weight_sync)
    sync_bucket_mb: float | None = None  # sglang distributed sync: flattened bucket size in MiB (None: 512)
    sync_master_address: str | None = None  # sglang distributed sync: trainer rank 0's address as the workers reach
    # it (None: 127.0.0.1 when every worker URL is loopback, else this host's name)
    seeded_sampling: bool | None = None  # sglang: a sampling_seed per sample (from trainer.seed, the step's call, the
    # prompt and sample index): reproducible rollouts when the servers run --enable-deterministic-inference (local
    # servers get it); None: off
    overlap: bool | None = None  # sglang: π_old / reference / OAR saliency of finished groups while the rest generate
    # (trainer/overlap.py; None: on with server_urls unless expert parallelism or MoE routing replay rules it out, off
    # with local servers, which share the trainer's devices; true: refused where ruled out)
    verify_sync: bool | None = None  # sglang: after every sync compare each worker's /weights_checker checksums with
    # those of the tensors sent (dense models, tp_size 1 servers; None: off)

    # Local servers (sglang with no server_urls): the run starts them on its initial weights and stops them at exit.
    local_servers: int | None = None  # how many (None: 1)
    local_router: bool | None = None  # also an sglang-router in front of them (None: no; the client balances)
    server_python: str | None = None  # their interpreter (None: $OAR_SGLANG_PYTHON, else the CPU venv's)
    server_dtype: str | None = None  # their --dtype (None: float32 on CPU, auto on GPU)
    server_args: list[str] = field(default_factory=list)  # extra sglang.launch_server arguments (every server)

    return_routed_experts: bool | None = None  # sglang, MoE routing replay from the rollout (R3): every /generate
    # asks for the routed experts (the servers need --enable-return-routed-experts; local servers get it) and π_old /
    # the updates replay them instead of π_old's own routes (None: off). MoE models with routing replay on only.

    def validate(self) -> RolloutConfig:
        if self.engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout.engine: unknown {self.engine!r}; known: {', '.join(ROLLOUT_ENGINES)}")
        for key in ("prompts_per_step", "n_samples", "max_new_tokens", "max_batch_size", "max_gen_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"rollout.{key}: must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature: training samples need temperature > 0 (the policy gradient is "
                             f"taken under the sampling distribution), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p: need 0 < top_p <= 1, got {self.top_p}")
        if self.engine == "sglang" and not self.server_urls and self.router_url:
            raise ValueError("rollout.router_url: needs rollout.server_urls (the workers that weights are pushed to); "
                             "without them the run starts local servers (rollout.local_router for a router)")
        for key in LOCAL_ONLY:
            if self.server_urls and getattr(self, key) not in (None, []):
                raise ValueError(f"rollout.{key}: only read when rollout.server_urls is empty (the run then starts "
                                 "its own servers); remove it or the URLs")
        if self.local_servers is not None and self.local_servers < 1:
            raise ValueError(f"rollout.local_servers: must be >= 1, got {self.local_servers}")
        for key in SGLANG_ONLY:
            if self.engine != "sglang" and getattr(self, key) not in (None, []):
                raise ValueError(f"rollout.{key}: only rollout.engine=sglang reads it; the {self.engine} engine "
                                 "generates in-process (remove it or use rollout=sglang)")
        for key in ("timeout_s", "update_timeout_s"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"rollout.{key}: must be > 0, got {getattr(self, key)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"rollout.max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"rollout.max_retries: must be >= 0, got {self.max_retries}")
        if self.min_valid_frac is not None and not 0 < self.min_valid_frac <= 1:
            raise ValueError(f"rollout.min_valid_frac: need 0 < min_valid_frac <= 1, got {self.min_valid_frac}")
        if self.weight_sync not in (None, *WEIGHT_SYNC_MODES):
            raise ValueError(f"rollout.weight_sync: unknown {self.weight_sync!r}; known: {', '.join(WEIGHT_SYNC_MODES)}")
        if self.sync_bucket_mb is not None and self.sync_bucket_mb <= 0:
            raise ValueError(f"rollout.sync_bucket_mb: must be > 0, got {self.sync_bucket_mb}")
        for url in self.server_urls + ([self.router_url] if self.router_url else []):
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"rollout.server_urls: {url!r} is not an http(s) URL")
        return self


LOCAL_ONLY = ("local_servers", "local_router", "server_python", "server_dtype", "server_args")
SGLANG_ONLY = ("server_urls", "router_url", "api_key", "timeout_s", "update_timeout_s", "max_concurrency",
               "max_retries", "min_valid_frac", "weight_sync", "sync_dir", "sync_bucket_mb", "sync_master_address",
               "overlap", "seeded_sampling", "verify_sync", "return_routed_experts", *LOCAL_ONLY)
SGLANG_CONCURRENCY = 64  # rollout.max_concurrency default
SGLANG_RETRIES = 3  # rollout.max_retries default
SGLANG_MIN_VALID_FRAC = 0.5  # rollout.min_valid_frac default


@dataclass(kw_only=True)
class SyntheticConfig:
    """The built-in verifiable tasks (``data.path: synthetic``): ``modsum`` (``a+b=`` → ``(a+b) mod base``,
    data/synthetic.py) and ``pivot`` (long responses whose few trace digits decide the reward, data/pivot.py)."""

    task: str = "modsum"  # modsum | pivot (the credit-assignment task: configs/data/pivot.yaml)
    base: int = 3  # the digits' range: answers are mod base
    reasoning_len: int = 4  # modsum: letters before the "#<digit>" answer in format warm-up examples
    pivots: int = 1  # pivot: trace steps (1: a+b=, 2: a+b+c=); their digits are the pivotal tokens
    filler_len: int = 64  # pivot: free letters around the trace in format warm-up and probe responses
    size: int = 4096  # distinct rows drawn (prompts repeat: there are base² distinct questions)
    format_warmup_steps: int = 40  # supervised steps on random-answer examples teaching the response format


@dataclass(kw_only=True)
class DataConfig:
    path: str = "synthetic"  # "synthetic" or a .jsonl / .parquet file
    tokenizer: str = "synthetic"  # "synthetic" or a local Hugging Face tokenizer directory
    layout: str | None = None  # a known dataset layout: sets the keys and answer extraction (None: prompt_key /
    # answer_key)
    prompt_key: str | None = None  # dotted path into a row; None: the layout's key, else "prompt"
    answer_key: str | None = None  # None: the layout's key, else "answer"
    prompt_template: str | None = None  # str.format template with {prompt}
    system_prompt: str | None = None  # a system message (with chat_template)
    chat_template: bool = False  # apply the tokenizer's chat template
    max_prompt_tokens: int | None = None  # longer prompts are skipped (and counted)
    shuffle: bool = True  # shuffle the prompts (each epoch)
    seed: int = 0  # shuffle seed

    # OAR segmentation (ALGORITHMS.md §5.1): where the answer starts and the string that elicits it
    answer_markers: list[str] = field(default_factory=lambda: ["</think>", "\\boxed{"])  # tried in order; the first
    # present (at its last occurrence) opens the answer span
    conclude: str = "\n\nTherefore, the final answer is \\boxed{"  # appended to the reasoning to elicit the answer
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> DataConfig:
        if self.layout not in (None, *DATA_LAYOUTS):
            raise ValueError(f"data.layout: unknown {self.layout!r}; known: {', '.join(DATA_LAYOUTS)}")
        if self.path == "synthetic" and self.layout is not None:
            # data=gsm8k|math|dapo_math leave `path: ???`, which does not replace the schema's synthetic default
            raise ValueError(f"data.path: the {self.layout} layout reads a prompt file with a real tokenizer; set "
                             f"data.path=<.jsonl/.parquet file> and data.tokenizer=<local Hugging Face tokenizer "
                             f"directory>")
        if self.path == "synthetic" and self.tokenizer != "synthetic":
            raise ValueError("data.tokenizer: the synthetic task has its own tokenizer; set data.tokenizer: synthetic")
        if self.path != "synthetic" and not self.path.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"data.path: expected 'synthetic' or a .jsonl/.parquet file, got {self.path!r}")
        if self.path != "synthetic" and self.tokenizer == "synthetic":
            raise ValueError(f"data.tokenizer: the synthetic tokenizer encodes only the built-in task, not the "
                             f"prompts of data.path={self.path}; set data.tokenizer=<local Hugging Face tokenizer "
                             f"directory>")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")
        s = self.synthetic
        if s.base < 2 or s.base > 10 or s.reasoning_len < 0 or s.size < 1 or s.format_warmup_steps < 0:
            raise ValueError("data.synthetic: need 2 <= base <= 10, reasoning_len >= 0, size >= 1, "
                             "format_warmup_steps >= 0")
        if s.task not in SYNTHETIC_TASKS:
            raise ValueError(f"data.synthetic.task: unknown {s.task!r}; known: {', '.join(SYNTHETIC_TASKS)}")
        if s.pivots not in (1, 2) or s.filler_len < 0:
            raise ValueError(f"data.synthetic: need pivots in (1, 2) and filler_len >= 0, got {s.pivots}, "
                             f"{s.filler_len}")
        return self


@dataclass(kw_only=True)
class OverlongConfig:
    """DAPO overlong reward shaping (Yu et al. 2025, eq. 13); ``max_len`` defaults to rollout.max_new_tokens."""

    enabled: bool = False  # apply the overlong penalty
    max_len: int | None = None  # L_max (None: rollout.max_new_tokens)
    cache_len: int = 4  # L_cache: the penalty ramps from 0 to -factor over the last cache_len tokens before max_len
    factor: float = 1.0  # penalty at max_len


@dataclass(kw_only=True)
class RewardConfig:
    fn: str = "synthetic_modsum"  # a registered name (math, synthetic_modsum, exact) or "package.module:function"
    timeout_s: float = 10.0  # per response; a timed-out verification scores 0 and is counted
    isolated: bool | None = None  # run in worker processes (None: the function's default; math: yes)
    num_workers: int = 2  # verifier worker processes (isolated functions)
    pass_threshold: float = 1.0  # a response "passes" when its score (before overlong shaping) >= this
    overlong: OverlongConfig = field(default_factory=OverlongConfig)

    def validate(self) -> RewardConfig:
        if self.timeout_s <= 0 or self.num_workers < 1:
            raise ValueError("reward.timeout_s / reward.num_workers: need timeout_s > 0 and num_workers >= 1")
        o = self.overlong
        if o.enabled and (o.cache_len < 1 or (o.max_len is not None and o.max_len <= o.cache_len)):
            raise ValueError("reward.overlong: need cache_len >= 1 and max_len > cache_len")
        return self


@dataclass(kw_only=True)
class EvalDatasetConfig:
    name: str = "synthetic"  # metric prefix (eval/<name>/...)
    path: str = "synthetic"  # "synthetic" or a .jsonl / .parquet file
    layout: str | None = None  # as data.layout
    prompt_key: str | None = None  # as data.prompt_key
    answer_key: str | None = None  # as data.answer_key
    limit: int | None = None  # first N problems


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 0  # run validation every N steps (0: only when asked, e.g. eval.at_end)
    at_start: bool = False  # evaluate before the first RL step
    at_end: bool = True  # evaluate after the last step
    datasets: list[EvalDatasetConfig] = field(default_factory=lambda: [EvalDatasetConfig()])  # what to evaluate
    k: int = 4  # samples per problem (avg@K, pass@k for k in ks <= K)
    ks: list[int] = field(default_factory=lambda: [1, 4])  # the k of the pass@k metrics
    temperature: float = 0.6  # evaluation sampling temperature
    top_p: float = 0.95  # evaluation nucleus sampling
    top_k: int = -1  # evaluation top-k (-1: off)
    max_new_tokens: int | None = None  # longest evaluation response (None: rollout.max_new_tokens)
    saliency_probe_every: int = 0  # pivot task: OAR saliency precision/AUROC on fixed probe rows every N steps (0: off)
    saliency_probe_size: int = 32  # rows of the saliency probe set (trainer/saliency_probe.py)

    def validate(self) -> EvalConfig:
        if self.every < 0 or self.k < 1:
            raise ValueError("eval.every / eval.k: need every >= 0 and k >= 1")
        if self.saliency_probe_every < 0 or self.saliency_probe_size < 1:
            raise ValueError(f"eval.saliency_probe_every / eval.saliency_probe_size: need >= 0 and >= 1, got "
                             f"{self.saliency_probe_every}, {self.saliency_probe_size}")
        bad = [k for k in self.ks if not 1 <= k <= self.k]
        if bad:
            raise ValueError(f"eval.ks: every k must be in [1, eval.k={self.k}], got {bad[0]}")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.datasets: duplicate name in {names}")
        return self


@dataclass(kw_only=True)
class TrainerConfig:
    steps: int = 200  # RL steps (rollout batches)
    seed: int = 0  # model init, sampling and OAR-G noise seed
    micro_batch_size: int = 16  # rows per micro-batch
    recompute: str | None = None  # activation recompute in the update: selective (attention), full (None: off)
    routing_replay: bool | None = None  # None: on for MoE
    world_size: int | None = None  # dry-run only: plan for this many ranks (default: the launcher's)
    dry_run: bool = False  # print the resolved plan and exit
    memory_check: bool = True  # refuse a plan whose memory estimate exceeds the device's memory (trainer/plan.py)
    preflight: bool = False  # check the cluster (groups, model, checkpoint, servers) and exit (trainer/preflight.py)
    progress: bool = True  # rich progress bars (only on a TTY)


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = None  # None: <logging.run_dir>/checkpoints
    every: int = 50  # steps; 0: only at the end
    keep_last: int = 2  # checkpoints kept (older ones are removed)
    resume: str = "auto"  # auto (latest in dir, if any) | never | a checkpoint directory
    save_final: bool = True  # save after the last step


@dataclass(kw_only=True)
class LoggingConfig:
    run_dir: str = "runs/default"  # metrics.jsonl, TensorBoard events, config.yaml, checkpoints (same on every rank)
    tensorboard: str = "auto"  # auto (if installed) | true | false
    wandb_project: str | None = None  # log to this W&B project (None: off)
    step_line: bool = True  # a concise line per step on rank 0
    log_every: int = 1  # print the step line every N steps (metrics.jsonl gets every step)


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig  # the policy's architecture and precision (configs/model/: presets)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout over ranks (docs/scaling.md)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # advantages, OAR shaping, loss, KL
    # (configs/algorithm/: one file per method, docs/algorithms.md)
    optim: OptimConfig = field(default_factory=OptimConfig)  # Adam, learning-rate schedule, clipping, loss scaling
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # sampling, the engine (local or SGLang servers,
    # docs/sglang_client.md) and weight sync
    data: DataConfig = field(default_factory=DataConfig)  # the prompt dataset, tokenizer and OAR answer markers
    reward: RewardConfig = field(default_factory=RewardConfig)  # the verifier, its timeout and workers
    eval: EvalConfig = field(default_factory=EvalConfig)  # avg@K / pass@k evaluation (also oar-eval)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # steps, micro-batches, dry run, preflight
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # dist-checkpoints and resume
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # run directory, metrics sinks, step line

    def validate(self, world_size: int = 1) -> ParallelLayout:
        """Every group's checks, then the cross-group batch arithmetic (module docstring). Returns the layout.
        Resolves defaults that depend on other groups in place: ``algorithm.loss.norm_len`` (Dr.GRPO's constant,
        ``seq-mean-token-sum-norm``) defaults to ``rollout.max_new_tokens``."""
        self.model.validate()
        layout = self.parallel.validate(world_size, self.model)
        if self.model.pretrained:
            from ..convert.checkpoint import check_pretrained_checkpoint, is_megatron_checkpoint
            from ..convert.config import check_pretrained  # pure: reads config.json / config.yaml only

            megatron = is_megatron_checkpoint(self.model.pretrained)
            (check_pretrained_checkpoint if megatron else check_pretrained)(self.model)
        self.algorithm.validate()
        self.optim.validate()
        resolve_precision(self.model.params_dtype, self.optim)  # optim settings that contradict the model dtype
        self.rollout.validate()
        self.data.validate()
        self.reward.validate()
        self.eval.validate()
        if self.eval.saliency_probe_every and (self.data.path != "synthetic" or self.data.synthetic.task != "pivot"):
            raise ValueError("eval.saliency_probe_every: the probe needs known pivotal tokens: data.path=synthetic "
                             "with data.synthetic.task=pivot (+experiment=pivot)")
        t = self.trainer
        if t.steps < 0 or t.micro_batch_size < 1:
            raise ValueError("trainer.steps / trainer.micro_batch_size: need steps >= 0 and micro_batch_size >= 1")
        if t.recompute not in (None, *RECOMPUTE_MODES):
            raise ValueError(f"trainer.recompute: unknown {t.recompute!r}; known: null, selective, full")
        if self.checkpoint.resume not in RESUME_MODES and not self.checkpoint.resume:
            raise ValueError("checkpoint.resume: 'auto', 'never' or a checkpoint directory")
        if self.checkpoint.every < 0:
            raise ValueError(f"checkpoint.every: must be >= 0, got {self.checkpoint.every}")
        if str(self.logging.tensorboard).lower() not in TENSORBOARD_MODES:
            raise ValueError(f"logging.tensorboard: auto | true | false, got {self.logging.tensorboard!r}")
        r = self.rollout
        if r.prompts_per_step % layout.dp:
            raise ValueError(f"rollout.prompts_per_step: {r.prompts_per_step} prompts do not split evenly over "
                             f"dp={layout.dp} data-parallel ranks")
        rows = r.prompts_per_step // layout.dp * r.n_samples
        if rows % t.micro_batch_size:
            raise ValueError(f"trainer.micro_batch_size: {rows} rows per data-parallel rank (prompts_per_step/dp * "
                             f"n_samples) are not a multiple of micro_batch_size={t.micro_batch_size}")
        micro = rows // t.micro_batch_size
        loss = self.algorithm.loss
        if loss.build().agg == "seq-mean-token-sum-norm" and loss.norm_len is None:
            # Dr.GRPO's constant normaliser: the longest response the rollout can produce, never a batch's padding
            loss.norm_len = r.max_new_tokens
        if micro % self.algorithm.updates_per_batch:
            raise ValueError(f"algorithm.updates_per_batch: {micro} micro-batches per rank do not split into "
                             f"{self.algorithm.updates_per_batch} equal mini-batches")
        if self.algorithm.advantage.estimator != "dr_grpo" and r.n_samples < 2:
            raise ValueError("rollout.n_samples: group-relative advantages need at least 2 samples per prompt")
        if r.engine == "local" and layout.pp > 1:
            raise ValueError("rollout.engine: the local engine needs parallel.pp=1 (generation under pipeline "
                             "parallelism goes through rollout.engine=sglang)")
        if r.engine == "local" and layout.cp > 1:
            raise ValueError("rollout.engine: the local engine needs parallel.cp=1 (a decode step cannot be split "
                             "into 2*cp chunks; CP rollouts go through rollout.engine=sglang)")
        if r.return_routed_experts:
            if not self.model.is_moe:
                raise ValueError("rollout.return_routed_experts: the model is dense (no MoE routers to replay)")
            if t.routing_replay is False:
                raise ValueError("rollout.return_routed_experts: replaying the rollout's routes needs "
                                 "trainer.routing_replay (true or null)")
            if layout.cp > 1 or self.parallel.packing:
                raise ValueError("rollout.return_routed_experts: not wired under parallel.cp > 1 or "
                                 "parallel.packing (the router's token order differs from the rows')")
        if layout.cp > 1 and layout.pp > 1 and self.algorithm.shaper.name == "oar":
            raise ValueError(f"parallel.cp: the OAR saliency pass under context parallelism is wired for pp=1, got "
                             f"pp={layout.pp} (algorithm.shaper.name: oar)")
        if self.data.path == "synthetic" and self.reward.fn == "math":
            raise ValueError("reward.fn: the synthetic task is scored by 'synthetic_modsum', not 'math'")
        if self.data.layout is not None and self.reward.fn == "synthetic_modsum":
            raise ValueError(f"reward.fn: {self.data.layout} answers are scored by math-verify (reward=math or "
                             f"reward=dapo), not the synthetic task's 'synthetic_modsum'")
        runs_eval = self.eval.at_start or self.eval.at_end or self.eval.every > 0
        synthetic_eval = [d.name for d in self.eval.datasets if d.path == "synthetic"]
        if runs_eval and self.data.path != "synthetic" and synthetic_eval:
            raise ValueError(f"eval.datasets: {synthetic_eval[0]!r} is the built-in synthetic task, which the "
                             f"{self.data.layout or 'file'} run's tokenizer and reward cannot score; evaluate a file "
                             f"(eval.datasets=[{{name: test, path: ..., layout: ...}}]) or skip it (eval=none)")
        return layout


# The keys whose validation accepts a closed set of values (a registry's names are read when asked): the one list
# docs/config_reference.md shows (tools/gen_config_reference.py); tests/test_config_reference.py checks that
# TrainConfig.validate refuses a value outside each set, naming the key. A null, where the type allows it, means
# the key's documented default behaviour.
KEY_CHOICES: dict[str, tuple[str, ...] | Any] = {
    "model.position_embedding_type": _model.POSITION_EMBEDDINGS,
    "model.rope_scaling": _model.ROPE_SCALINGS,
    "model.normalization": _model.NORMALIZATIONS,
    "model.moe_router_score_function": _model.ROUTER_SCORES,
    "model.moe_router_dtype": _model.ROUTER_DTYPES,
    "model.moe_router_load_balancing_type": _model.LOAD_BALANCING,
    "model.moe_token_dispatcher_type": _model.DISPATCHERS,
    "model.transformer_impl": _model.TRANSFORMER_IMPLS,
    "model.params_dtype": _model.PARAMS_DTYPES,
    "model.fp8": _model.FP8_FORMATS,
    "model.fp8_recipe": _model.FP8_RECIPES,
    "parallel.order": ORDERS,
    "algorithm.advantage.estimator": advantage_estimators,
    "algorithm.shaper.name": SHAPERS,
    "algorithm.shaper.saliency": SALIENCY_METHODS,
    "algorithm.shaper.pfinal_mode": PFINAL_MODES,
    "algorithm.loss.name": policy_losses,
    "algorithm.loss.agg": AGG_MODES,
    "algorithm.kl.kind": KL_KINDS,
    "algorithm.rollout_correction.mode": CORRECTION_MODES,
    "algorithm.rollout_correction.level": CORRECTION_LEVELS,
    "optim.lr_decay_style": LR_DECAY_STYLES,
    "rollout.engine": ROLLOUT_ENGINES,
    "rollout.weight_sync": WEIGHT_SYNC_MODES,
    "data.layout": DATA_LAYOUTS,
    "data.synthetic.task": SYNTHETIC_TASKS,
    "trainer.recompute": RECOMPUTE_MODES,
    "logging.tensorboard": TENSORBOARD_MODES,
}


def train_config_from(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Hydra's composed ``DictConfig`` (or a plain dict) → a :class:`TrainConfig` object; unknown keys and wrong
    types fail with the key named."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        raise ValueError(f"{key}: {msg}" if key else f"config: {msg}") from None
    return obj
