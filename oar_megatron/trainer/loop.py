"""The RL loop: one object per rank that runs

    rollout → reward → advantage → (saliency → reshape) → loss → update → weight sync → metrics → checkpoint

for every algorithm, on one CPU or under torchrun/Slurm. Data flows one way through a step (``Trainer.step``);
nothing downstream reaches back.

Ranks. Prompts of a global step (``rollout.prompts_per_step``, deterministic order from the prompt iterator) are
split evenly over data-parallel ranks; every tensor-parallel rank of a data-parallel replica generates the same
samples (same sampling seed) and rewards are computed once per replica (TP rank 0) and broadcast over the TP group.
Row ids are global and name the sample (``_row_base``: step, generation round, prompt slot, sample), so OAR-G's noise
is the same under any split, and with the sglang engine's overlapped passes (``trainer/overlap.py``), which run on
groups as they finish, before the batch's order is known.

Reproducibility. Sampling seeds come from the engine's call counter, OAR-G noise from row ids, the prompt order
from the iterator's state; all of it, with the model, optimizer, scheduler and RNG, is in the checkpoint, so a
resumed CPU run reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from .. import collectives
from ..algorithms import whiten
from ..algorithms.losses import kl_penalty
from ..algorithms.oar import credit_metrics
from ..config.train import TrainConfig
from ..metrics.logger import MetricsLogger
from ..metrics.progress import Progress, format_step_line
from ..rollout.base import SamplingParams
from .experience import (Experience, Group, filter_stats, group_advantages_of, response_content, scoring_for,
                         select_groups)
from .overlap import OverlapPasses
from .sources import build_dataset, build_reward, build_tokenizer, iterator_for


# per-rank counts: logged as totals over data-parallel replicas (everything else is a mean)
COUNT_KEYS = ("reward/timeouts", "reward/errors", "rollout/filled_groups", "rollout/overlap_unused_rows", "rollout/groups_all_correct",
              "rollout/groups_all_wrong", "rollout/groups_uninformative", "rollout/samples",
              "throughput/response_tokens", "throughput/total_tokens")
# the sglang engine's per-call counts (rollout/invalid_<reason>: rejected responses by reason; the http_<code>
# reasons folded into rollout/invalid_http), summed over generation rounds; always present so every rank logs them
INVALID_REASONS = ("shape", "abort", "finish", "empty", "vocab", "logprob_len", "logprob_value", "length",
                   "weight_version", "timeout", "connect", "transport", "json", "http")
ENGINE_COUNT_KEYS = ("rollout/invalid_groups", "rollout/invalid_responses", "rollout/retries", "rollout/failovers",
                     *(f"rollout/invalid_{r}" for r in INVALID_REASONS))
# the reward's per-call counts (summed over dynamic-sampling rounds, and reported as rates over all samples under
# the names given); every other per-call reward statistic is a rate, averaged over rounds weighted by samples
REWARD_COUNTS = {"reward/timeouts": "reward/timeout_frac", "reward/errors": "reward/error_frac"}


class Trainer:
    """``Trainer(cfg).fit()``; see the module docstring. Construction initialises the process groups, builds the
    policy, engine, data, reward, logger and checkpoint manager, and resumes when a checkpoint is found."""

    def __init__(self, cfg: TrainConfig, *, evaluating: bool = False) -> None:
        from ..checkpoint import CheckpointManager
        from ..policy import init_parallel
        from ..policy.actor import PolicyActor
        from ..rollout.local import LocalEngine

        self.cfg = cfg
        self.groups = g = init_parallel(cfg.parallel, cfg.model, seed=cfg.trainer.seed)
        cfg.validate(g.world_size)
        self.run_dir = Path(collectives.broadcast_object(str(Path(cfg.logging.run_dir).resolve())))
        self.is_logger = g.rank == 0
        self.tokenizer = build_tokenizer(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                             f"({self.tokenizer.vocab_size})")
        self.dataset = build_dataset(cfg.data, self.tokenizer)
        self.iterator = iterator_for(self.dataset, cfg.rollout.prompts_per_step, cfg.data).shard(g.dp_rank, g.dp)
        self.reward = build_reward(cfg.reward, cfg.rollout.max_new_tokens) if g.tp_rank == 0 else None
        self.actor = PolicyActor(model=cfg.model, parallel=cfg.parallel, optim=cfg.optim, algorithm=cfg.algorithm,
                                 groups=g, micro_batch_size=cfg.trainer.micro_batch_size,
                                 recompute=cfg.trainer.recompute, routing_replay=cfg.trainer.routing_replay,
                                 temperature=cfg.rollout.temperature, saliency_seed=cfg.trainer.seed,
                                 reference=None)  # the KL reference: set in fit() or loaded by _maybe_resume
        if cfg.rollout.engine == "sglang":
            self.engine = self._sglang_engine()
        else:
            self.engine = LocalEngine(self.actor.chunks, vocab_size=self.tokenizer.vocab_size,
                                      tp_group=g.tp_group if g.tp > 1 else None,
                                      max_batch_size=cfg.rollout.max_batch_size, pad_id=self.tokenizer.pad_token_id,
                                      seed=cfg.trainer.seed * 1_000_003 + g.dp_rank)
        self.overlap = self._overlap_on()
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.ckpt = CheckpointManager(ckpt_dir, keep_last=cfg.checkpoint.keep_last, groups=g)
        self.step = 0
        self.warmed_up = False
        self._probe = None  # the saliency probe (eval.saliency_probe_every), built on first use
        self._servers_ready = False  # sglang: servers checked and holding the trainer's weights (_prepare_servers)
        resume = self._resume_path()
        if cfg.model.pretrained and resume is None:  # a resumed run's checkpoint wins
            from ..convert.checkpoint import is_megatron_checkpoint

            if is_megatron_checkpoint(cfg.model.pretrained):
                self._load_pretrained_checkpoint()
            else:
                self._load_pretrained()
        resumed = self._maybe_resume(resume, evaluating)
        tb = {"auto": "auto", "true": True, "false": False}.get(str(cfg.logging.tensorboard).lower(), "auto")
        wandb = {"project": cfg.logging.wandb_project} if cfg.logging.wandb_project else None
        # resumed: drop what the interrupted run logged after its checkpoint; fresh: start the file over;
        # oar-eval appends to the run's file
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_logger, tensorboard=tb, wandb=wandb,
                                    resume_step=None if evaluating else (self.step if resumed else -1))
        if self.is_logger and not evaluating:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.progress = Progress(enabled=self.is_logger and cfg.trainer.progress)

    # ------------------------------------------------------------------------------------------ lifecycle

    def _sglang_engine(self):
        """The SGLang client for this rank's replica (``rollout.sglang.SGLangEngine`` behind ``ReplicaEngine``):
        generation on the replica's first rank, weights pushed from disk by global rank 0 (docs/sglang_client.md)."""
        from ..config.train import SGLANG_CONCURRENCY, SGLANG_MIN_VALID_FRAC, SGLANG_RETRIES, SGLANG_TIMEOUT_S
        from ..convert.config import check_pretrained, read_hf_config
        from ..convert.source import arch_of_model
        from ..rollout.replica import ReplicaEngine
        from ..rollout.sglang import SGLangEngine

        cfg, r, g = self.cfg, self.cfg.rollout, self.groups
        if not r.server_urls and not torch.cuda.is_available():  # what SGLang 0.5.23's CPU backend cannot (measured)
            if r.seeded_sampling:
                raise ValueError("rollout.seeded_sampling: local CPU servers cannot honour sampling seeds (SGLang's "
                                 "--enable-deterministic-inference needs a GPU attention backend: triton, flashinfer, "
                                 "fa3)")
            if r.return_routed_experts:
                raise ValueError("rollout.return_routed_experts: local CPU servers cannot capture routes (SGLang pins "
                                 "the routes' host buffer with cudaHostRegister); use GPU servers or server_urls")
        if cfg.model.pretrained:
            arch, hf_config, carried = check_pretrained(cfg.model), read_hf_config(cfg.model.pretrained), \
                cfg.model.pretrained
        else:
            arch, hf_config, carried = arch_of_model(cfg.model), None, None
        if arch is None:
            raise ValueError("rollout.engine: weight sync of an MoE model to sglang needs model.pretrained (its "
                             "config.json names the HF architecture)")
        local = None
        if not r.server_urls:  # the run's own servers, started in fit() on the exported initial weights
            local = {"n": r.local_servers or 1, "router": bool(r.local_router), "python": r.server_python,
                     "dtype": r.server_dtype, "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "extra_args": list(r.server_args) + (["--enable-deterministic-inference"] if r.seeded_sampling
                                                          and "--enable-deterministic-inference" not in r.server_args
                                                          else [])
                                   + (["--enable-return-routed-experts"] if r.return_routed_experts else []),
                     "run_dir": self.run_dir / "sglang",
                     "env": {"PYTHONPATH": ""}}  # the servers run in their own environment
        inner = SGLangEngine(
            r.server_urls, vocab_size=cfg.model.vocab_size, router_url=r.router_url, api_key=r.api_key,
            timeout_s=r.timeout_s or SGLANG_TIMEOUT_S, update_timeout_s=r.update_timeout_s or SGLANG_TIMEOUT_S,
            max_concurrency=r.max_concurrency or SGLANG_CONCURRENCY,
            max_retries=SGLANG_RETRIES if r.max_retries is None else r.max_retries,
            min_valid_frac=r.min_valid_frac or SGLANG_MIN_VALID_FRAC,
            sync_dir=r.sync_dir or self.run_dir / "weight_sync", model=cfg.model, arch=arch, hf_config=hf_config,
            carried_from=carried, weight_sync=r.weight_sync or "disk", seed=cfg.trainer.seed * 1_000_003 + g.dp_rank,
            local_servers=local, seeded=bool(r.seeded_sampling), verify_sync=bool(r.verify_sync),
            routed_experts=_route_spec(cfg), **_distributed_sync_args(r))
        return ReplicaEngine(inner, g)

    def _overlap_on(self) -> bool:
        """``rollout.overlap`` resolved: the sglang engine's overlapped passes (``trainer/overlap.py``). Default: on
        with external servers (``server_urls``: their own devices, so the passes use the trainer's idle ones), off
        with the run's local servers (they share the trainer's devices: the passes would compete with generation);
        ``true`` where the layout rules the overlap out is refused with the reason."""
        setting, g = self.cfg.rollout.overlap, self.groups
        if self.cfg.rollout.engine != "sglang" or setting is False:
            return False
        if setting is None and not self.cfg.rollout.server_urls:
            return False
        reason = None
        if g.ep > 1:
            reason = (f"expert parallelism (ep={g.ep}): the EP all-to-all spans data-parallel ranks whose groups "
                      "finish at different times")
        elif self.actor.replays:
            reason = ("MoE routing replay records the routes per micro-batch of the step's whole batch "
                      "(trainer.routing_replay=false to overlap)")
        if reason is not None and setting is True:
            raise ValueError(f"rollout.overlap: not with {reason}")
        return reason is None

    def _maybe_resume(self, path: Path | None, evaluating: bool = False) -> bool:
        """Load ``path`` (``_resume_path``: the checkpoint ``checkpoint.resume`` names; None: nothing to load) —
        model, optimizer, KL reference, trainer state.

        Same layout: every rank gets its own RNG, engine and iterator state back (the run continues exactly).
        Another data-parallel size (the only change the optimizer state reshards over): model, reference and
        optimizer reshard; the per-rank rollout state is re-derived for the new ranks: the shared counters (step,
        the iterator's position, the engine's call count and weight version) from the checkpoint, each rank's
        sampling stream from its engine seed (``trainer.seed`` and its new DP rank). The samples then differ from
        the uninterrupted run's (it sampled with the old ranks' streams), deterministically. Any other layout
        change is refused by the checkpoint manager with one line."""
        from ..checkpoint import CheckpointError

        if path is None:
            return False
        same = self.ckpt.same_layout(path)
        # oar-eval needs no KL reference; training with kl.coef > 0 does (a checkpoint without one is an error)
        state = self.ckpt.load(self.actor, path, load_rng=same, load_reference=False if evaluating else None)
        common, mine = state["common"], state["per_rank"]
        self.step = int(common["step"])
        self.warmed_up = bool(common.get("warmed_up", True))
        if mine is not None:
            if int(mine["dp_rank"]) != self.groups.dp_rank:
                raise CheckpointError(f"{path}: rank {self.groups.rank} was DP rank {mine['dp_rank']} when saved and "
                                      f"is DP rank {self.groups.dp_rank} now")
            self.iterator.load_state_dict(mine["iterator"])
            self.engine.load_state_dict(mine["engine"])
        else:
            self.iterator.load_state_dict(common["iterator"])
            self.engine.load_state_dict(common["engine"])  # counters only: this rank keeps its own seed
            old = self.ckpt.saved_layout(path)
            ref = ", KL reference" if self.actor.has_reference else ""
            self._print(f"data-parallel layout changed (dp {old['dp']} -> {self.groups.dp}): model{ref} and optimizer "
                        f"resharded; rollout sampling streams re-derived for the new ranks (samples differ from an "
                        f"uninterrupted dp {old['dp']} run)")
        self._print(f"resumed from {path} at step {self.step}")
        return True

    def _load_pretrained_checkpoint(self) -> None:
        """``model.pretrained`` naming a megatron checkpoint (``oar-convert hf-to-mcore``'s converted checkpoint, or a
        trainer run's checkpoint root / step directory): its model weights load with dist-checkpointing under this
        run's layout, whatever the saved one — any TP / PP / EP, another vocabulary padding (``load_model_weights``:
        no optimizer, RNG or reference); the architecture was checked against the checkpoint's ``hf/config.json``
        or run ``config.yaml`` (``check_pretrained_checkpoint``). Then as for an HF directory: the optimizer's main
        weights are refreshed, the format warm-up is skipped and ``fit`` takes the loaded model as the KL
        reference."""
        from ..checkpoint import load_model_weights
        from ..convert.checkpoint import check_pretrained_checkpoint

        g, path = self.groups, self.cfg.model.pretrained
        arch = check_pretrained_checkpoint(self.cfg.model)
        load_model_weights(self.actor.models, path)
        self.actor.optimizer.reload_model_params()
        self.warmed_up = True
        self._print(f"loaded pretrained weights from megatron checkpoint {path} ({arch}, tp={g.tp}, pp={g.pp}, "
                    f"ep={g.ep})")

    def _resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names (``auto``: the latest in the checkpoint directory), or None."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        return self.ckpt.latest() if mode == "auto" else Path(mode)

    def _load_pretrained(self) -> None:
        """``model.pretrained``: each rank reads, for each of its model chunks (one, or ``virtual_pp`` when
        interleaved), that chunk's layers of its TP (MoE: and EP / expert-TP) shard of the HF safetensors (one tensor
        at a time, ``convert.mapping.load_hf_chunks``) into the actor's model, then refreshes the
        optimizer's main weights from it (mixed precision keeps fp32 copies). With tied embeddings under PP > 1 the
        last stage's ``output_layer.weight`` (megatron's copy of the embedding, kept in sync by all-reducing its
        gradient with the first stage's over the embedding group) gets the same HF embedding rows. The format warm-up
        (which stands in for pretraining) is skipped, so ``fit`` takes the loaded model as the KL reference."""
        from ..convert import SafetensorsReader
        from ..convert.config import check_pretrained
        from ..convert.mapping import load_hf_chunks

        g, path = self.groups, self.cfg.model.pretrained
        arch = check_pretrained(self.cfg.model)
        with SafetensorsReader(path) as src:
            load_hf_chunks(src, self.cfg.model, arch, self.actor.models, g)
        self.actor.optimizer.reload_model_params()
        self.warmed_up = True
        layout = (f"tp={g.tp}" + (f", pp={g.pp}" if g.pp > 1 else "") + (f", vpp={g.vpp}" if g.vpp else "")
                  + (f", ep={g.ep}" if g.ep > 1 else ""))
        self._print(f"loaded pretrained weights from {path} ({arch}, {layout})")

    def save(self) -> Path:
        """Checkpoint: ``common`` (written once) holds what every rank shares: the step, the global prompt
        iterator's position and the engine's shared counters (call count, weight version; the re-derivation
        source when the layout changes); ``per_rank`` holds each rank's own engine state (its seed differs per DP
        rank), its iterator shard and its DP rank, loaded back on the same rank (``_maybe_resume``)."""
        engine = self.engine.state_dict()
        common = {"step": self.step, "warmed_up": self.warmed_up, "iterator": self.iterator.state_dict(),
                  "engine": {k: v for k, v in engine.items() if k != "seed"}}
        per_rank = {"dp_rank": self.groups.dp_rank, "engine": engine, "iterator": self.iterator.state_dict()}
        return self.ckpt.save(self.step, self.actor, common=common, per_rank=per_rank)

    def close(self) -> None:
        from ..policy import destroy_parallel

        if self.reward is not None:
            self.reward.close()
        self.logger.close()
        self.engine.close()
        destroy_parallel()

    def _print(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)

    # ------------------------------------------------------------------------------------------- the run

    def fit(self) -> list[dict[str, float]]:
        """Warm-up (synthetic task only), then ``trainer.steps`` RL steps with evaluation and checkpoints.
        Returns the per-step metrics of this invocation."""
        cfg = self.cfg
        history = []
        local_servers = cfg.rollout.engine == "sglang" and not cfg.rollout.server_urls
        if local_servers:  # the run's own servers load (on the exported initial weights) while the trainer warms up
            self.engine.start_local_servers(self.actor, wait=False)
        if not self.warmed_up:
            self.format_warmup()
        if not self.actor.has_reference:  # the KL reference is the policy RL starts from (loaded when resumed)
            self.actor.set_reference_from_current()
        self._prepare_servers()
        if cfg.eval.at_start and self.step == 0:
            self.evaluate()
        probe_every = cfg.eval.saliency_probe_every
        if probe_every and self.step == 0:
            self.saliency_probe()
        while self.step < cfg.trainer.steps:
            metrics = self.train_step()
            history.append(metrics)
            if probe_every and self.step % probe_every == 0:
                self.saliency_probe()
            if self.is_logger and cfg.logging.step_line and self.step % cfg.logging.log_every == 0:
                print(format_step_line(self.step, metrics), flush=True)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.trainer.steps:
                self.evaluate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
        if cfg.eval.at_end:
            self.evaluate()
        if cfg.checkpoint.save_final and (not self.ckpt.latest() or self.ckpt.latest().name != _step_dir(self.step)):
            self.save()
        return history

    def format_warmup(self) -> None:
        """Teach the synthetic task's response format (random answers, so chance accuracy) by maximum likelihood:
        ``actor.sft_update``, one supervised step on the mean token NLL of the examples per warm-up step. Stands in
        for the pretrained model real RL starts from; recorded as ``warmup/*`` metrics."""
        from .sources import synthetic_task

        steps = self.cfg.data.synthetic.format_warmup_steps if self.cfg.data.path == "synthetic" else 0
        if steps == 0:
            self.warmed_up = True
            return
        task = synthetic_task(self.cfg.data)
        rows = self.cfg.rollout.prompts_per_step // self.groups.dp * self.cfg.rollout.n_samples
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 7919 + self.groups.dp_rank)
        for i in range(steps):
            pairs = task.format_examples(rows, gen)
            batch = self.actor.pack([p for p, _ in pairs], [r for _, r in pairs], torch.zeros(rows),
                                    pad_id=self.tokenizer.pad_token_id)
            out = self.actor.sft_update(batch)
            if self.is_logger and (i + 1) % 10 == 0:
                self.logger.log(0, {"warmup/loss": out["loss"][-1], "warmup/step": float(i + 1)}, phase="warmup")
        self.warmed_up = True

    # ------------------------------------------------------------------------------------- one RL step

    def _sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                              stop_token_ids=tuple(self.tokenizer.eos_token_ids), n=r.n_samples).validate()

    def _score(self, groups_in: list[tuple[Any, list]], row_base: list[int]) -> tuple[list[Group], dict[str, float]]:
        """Rewards for (record, samples) pairs, computed on TP rank 0 and broadcast over the TP group; group i's
        rows get the ids ``row_base[i] + j``."""
        n = self.cfg.rollout.n_samples
        payload = None
        if self.reward is not None:
            texts, answers, metas, lengths = [], [], [], []
            for rec, samples in groups_in:
                for s in samples:
                    texts.append(self.tokenizer.decode(response_content(s.response_ids, self.tokenizer.eos_token_ids)))
                    answers.append(rec.answer)
                    metas.append(dict(rec.meta))
                    lengths.append(len(s.response_ids))
            scores, raw, stats = self.reward(texts, answers, metas, lengths)
            payload = (scores, raw, stats)
        if self.groups.tp > 1:
            payload = collectives.broadcast_object(payload, group=self.groups.tp_group)
        scores, raw, stats = payload
        thr = self.cfg.reward.pass_threshold
        out = []
        for i, (rec, samples) in enumerate(groups_in):
            sl = slice(i * n, (i + 1) * n)
            out.append(Group(list(rec.prompt_ids), [list(s.response_ids) for s in samples],
                             [list(s.logprobs) for s in samples], [s.finish_reason for s in samples],
                             list(scores[sl]), [r >= thr for r in raw[sl]], rec.index, rec.answer,
                             row_ids=list(range(row_base[i], row_base[i] + len(samples))),
                             routes=None if samples[0].routed_experts is None
                             else [s.routed_experts for s in samples]))
        return out, stats

    def _row_base(self, rnd: int, i: int) -> int:
        """The first row id of this rank's prompt ``i`` in generation round ``rnd`` (0-based) of the current step:
        ``((step · max_gen_batches + rnd) · prompts_per_step + dp_rank · prompts_per_rank + i) · n_samples``. Global
        and position-free: it names the sample, not its place in the batch, so OAR-G's noise (seeded by it) is the
        same under any data-parallel split, with or without dynamic sampling's selection, and with the overlapped
        passes (computed before the batch's order is known)."""
        r, g = self.cfg.rollout, self.groups
        per = r.prompts_per_step // g.dp
        return (((self.step * r.max_gen_batches + rnd) * r.prompts_per_step + g.dp_rank * per + i) * r.n_samples)

    def _pack(self, groups: list[Group], advantages: torch.Tensor | None = None):
        """The training rows of ``groups`` (``PolicyActor.pack``): prompt | response, rollout log-probs, OAR scoring
        sequences when the shaper needs them, row ids; zero advantages unless given."""
        cfg, actor = self.cfg, self.actor
        exp = Experience(list(groups), torch.zeros(sum(len(g.responses) for g in groups))
                         if advantages is None else advantages)
        scoring = None
        if cfg.algorithm.shaper.name == "oar":
            scoring = scoring_for(exp, self.tokenizer, answer_markers=cfg.data.answer_markers,
                                  conclude=cfg.data.conclude, eos_token_ids=self.tokenizer.eos_token_ids,
                                  pad_id=self.tokenizer.pad_token_id, with_answers=cfg.algorithm.pfinal_mode != "last")
        return actor.pack(exp.prompts, exp.responses, exp.advantages, pad_id=self.tokenizer.pad_token_id,
                          rollout_logp=exp.rollout_logprobs, scoring=scoring, row_ids=exp.row_ids)

    def _overlap_passes(self) -> OverlapPasses | None:
        """This step's store of overlapped passes (``trainer/overlap.py``), or None when the overlap is off."""
        if not self.overlap:
            return None
        return OverlapPasses(self.actor, self._pack, micro_batch_size=self.cfg.trainer.micro_batch_size,
                             saliency=self.cfg.algorithm.shaper.name == "oar")

    def _rollout(self, passes: OverlapPasses | None = None) -> tuple[Experience, dict[str, float]]:
        """Generate, score and select this rank's groups (with DAPO dynamic sampling when configured). Groups are
        scored as the engine streams them; with ``passes``, those that may be trained on get their forward passes
        right away, while the rest still generate."""
        cfg, g = self.cfg, self.groups
        want = cfg.rollout.prompts_per_step // g.dp
        dynamic = cfg.algorithm.advantage.filter_groups
        params = self._sampling()
        candidates: list[Group] = []
        stats: dict[str, float] = {}
        reward_sums: dict[str, float] = {}  # counts summed; rates weighted by the call's samples
        gen_tokens, rounds, n_samples = 0, 0, 0
        lags: list[int] = []
        t0 = time.perf_counter()
        for rounds in range(1, cfg.rollout.max_gen_batches + 1):
            records = self.iterator.next_batch()
            # may a group of this round be trained on? (the round's own order decides among its groups, later)
            before = len(candidates) if not dynamic else sum(c.informative for c in candidates)
            arrived: list[tuple[int, Group]] = []
            with self.progress.phase("rollout", total=len(records) * params.n) as advance:
                for batch in self.engine.stream_groups([r.prompt_ids for r in records], params):
                    batch = sorted(batch, key=lambda pair: pair[0])
                    samples = [s for _, group in batch for s in group]
                    advance(len(samples))
                    gen_tokens += sum(len(s.response_ids) for s in samples)
                    n_samples += len(samples)
                    lags += [self.engine.weight_version - s.weight_version for s in samples
                             if s.weight_version is not None]
                    t_r = time.perf_counter()
                    scored, rstats = self._score([(records[i], group) for i, group in batch],
                                                 [self._row_base(rounds - 1, i) for i, _ in batch])
                    stats["time/reward_s"] = stats.get("time/reward_s", 0.0) + time.perf_counter() - t_r
                    for k, v in rstats.items():
                        reward_sums[k] = reward_sums.get(k, 0.0) + float(v) * (1 if k in REWARD_COUNTS
                                                                               else len(samples))
                    arrived += [(i, grp) for (i, _), grp in zip(batch, scored)]
                    if passes is not None and before < want:
                        t_p = time.perf_counter()
                        passes.add([grp for grp in scored if grp.informative or not dynamic])
                        stats["time/overlap_s"] = stats.get("time/overlap_s", 0.0) + time.perf_counter() - t_p
            _add_engine_counts(stats, getattr(self.engine, "last_stats", {}))
            candidates += [grp for _, grp in sorted(arrived, key=lambda pair: pair[0])]  # prompt order
            if not dynamic and cfg.rollout.engine == "local":
                break
            # another round when dynamic sampling lacks informative groups, or rejected groups left the batch short
            short = len(candidates) < want or (dynamic and sum(c.informative for c in candidates) < want)
            if not collectives.any_rank(short):
                break
        if len(candidates) < want:
            raise RuntimeError(f"rollout: only {len(candidates)} valid groups of the {want} this rank needs after "
                               f"{rounds} generation rounds (rollout.max_gen_batches); see the rollout/invalid_* "
                               f"counts and the server logs")
        # per-call reward statistics over all samples of all rounds: counts stay counts, rates are rates (<= 1)
        for k, v in reward_sums.items():
            if k in REWARD_COUNTS:
                stats[k] = v
                stats[REWARD_COUNTS[k]] = v / max(n_samples, 1)
            else:
                stats[k] = v / max(n_samples, 1)
        stats["rollout/samples"] = float(n_samples)
        first = candidates[:want]  # the step's own prompts: reward metrics describe the policy, not the filter
        stats.update(filter_stats(first))
        chosen, filled = select_groups(candidates, want, dynamic=dynamic)
        adv = group_advantages_of(chosen, cfg.algorithm)
        if cfg.algorithm.advantage.whiten:  # host advantages: moments summed over the DP group's gloo twin
            adv = whiten(adv, group=collectives.control_group(g.dp_group) if g.dp > 1 else None)
        busy = stats.get("time/reward_s", 0.0) + stats.get("time/overlap_s", 0.0)
        stats.update({
            "reward/mean": _mean([s for c in first for s in c.scores]),
            "reward/pass_rate": _mean([float(p) for c in first for p in c.passed]),
            "response/length_mean": _mean([len(r) for c in first for r in c.responses]),
            "response/truncated_frac": _mean([float(f == "length") for c in first for f in c.finish]),
            "rollout/gen_rounds": float(rounds), "rollout/filled_groups": float(filled),
            "rollout/tokens_per_s": gen_tokens / max(time.perf_counter() - t0 - busy, 1e-9),
            # staleness: versions between the weights being trained and those that generated the samples
            "rollout/weight_version_lag": _mean(lags) if lags else 0.0,
        })
        return Experience(chosen, adv, filled, stats), stats

    def train_step(self) -> dict[str, float]:
        cfg, g, actor = self.cfg, self.groups, self.actor
        alg = cfg.algorithm
        times: dict[str, float] = {}
        t_step = tick = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            times[f"time/{name}_s"] = now - tick
            tick = now

        passes = self._overlap_passes()
        exp, stats = self._rollout(passes)
        lap("rollout")
        batch = self._pack(exp.groups, exp.advantages)
        actor.set_rollout_routes(batch, exp.routed_experts)  # R3: None unless rollout.return_routed_experts
        saliency = None
        if passes is not None:  # the passes of the groups that finished early ran during the rollout
            saliency = passes.fill(batch, exp.groups)
            stats.update(passes.stats)
        else:
            actor.compute_ref_logprobs(batch)
            actor.compute_old_logprobs(batch)
        lap("logprob")
        actor.compute_token_advantages(batch, saliency=saliency)
        lap("advantage")
        with self.progress.phase("update", total=alg.updates_per_batch) as advance:
            upd = actor.update(batch)
            advance(alg.updates_per_batch)
        lap("update")
        self.engine.sync_weights(actor)
        lap("sync")
        sync_stats = dict(getattr(self.engine, "last_sync_stats", {}))
        self.step += 1

        m = dict(stats)
        m.update(self._batch_metrics(batch))
        m.update(sync_stats)
        # real tokens of this rank's training rows (no padding): responses, and prompts + responses
        m["throughput/response_tokens"] = float(sum(len(r) for r in exp.responses))
        m["throughput/total_tokens"] = m["throughput/response_tokens"] + float(sum(len(p) for p in exp.prompts))
        # MoE routing-replay drift (per update → the step's mean), averaged over ranks like the other statistics
        m.update({k: _mean(v) for k, v in upd.items() if k.startswith("routing/")})
        m.update(actor.old_routing_metrics)  # R3: π_old's routing vs the rollout's (empty otherwise)
        m = collectives.mean_over_ranks(m)  # rank-local statistics → replica mean (equal rows per rank); counts → totals
        for key in COUNT_KEYS + ENGINE_COUNT_KEYS:
            if key in m:
                m[key] *= g.dp
        m.update({
            "loss/total": _mean(upd["loss"]), "loss/pg": _mean(upd.get("pg_loss", [])),
            "grad_norm": _mean(upd["grad_norm"]), "lr": upd["lr"][-1],
            "update/skipped": float(sum(1 - u for u in upd["updated"])),
        })
        for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "dual_clip_frac", "mask_frac"):
            if key in upd:
                m[f"policy/{key}"] = _mean(upd[key])
        if "kl_loss" in upd:
            m["loss/kl"] = _mean(upd["kl_loss"])
        if "entropy_loss" in upd:
            m["loss/entropy"] = _mean(upd["entropy_loss"])
        m.update(times)
        m["time/step_s"] = time.perf_counter() - t_step
        m["throughput/response_tokens_per_s"] = m["throughput/response_tokens"] / m["time/step_s"]
        m["throughput/total_tokens_per_s"] = m["throughput/total_tokens"] / m["time/step_s"]
        m["weight_version"] = float(self.engine.weight_version)
        self.logger.log(self.step, m)
        return m

    def _batch_metrics(self, batch) -> dict[str, float]:
        """Per-rank statistics of the training batch (last pipeline stage holds the log-probs)."""
        out: dict[str, float] = {}
        mask = batch.response_mask
        if batch.old_logp is not None:
            tok = mask.sum().clamp(min=1)
            out["entropy/mean"] = float(-(batch.old_logp * mask).sum() / tok)  # Monte-Carlo: E[−log π_old(y_t)]
            if batch.rollout_logp is not None:
                diff = (batch.old_logp - batch.rollout_logp).abs() * mask
                out["rollout/logp_diff_abs_mean"] = float(diff.sum() / tok)
                out["rollout/logp_diff_abs_max"] = float(diff.max()) if diff.numel() else 0.0
            if batch.ref_logp is not None:
                kl = kl_penalty(batch.old_logp, batch.ref_logp, self.cfg.algorithm.kl.kind)
                out["kl/mean"] = float((kl * mask).sum() / tok)
        if batch.token_weights is not None:
            out["rollout/is_weight_mean"] = float((batch.token_weights * mask).sum() / mask.sum().clamp(min=1))
        if batch.token_advantages is not None:
            carry = (mask & (batch.token_advantages != 0)).any(-1)
            if bool(carry.any()):
                cm = credit_metrics(batch.token_advantages[carry], mask[carry])
                out["oar/ess_ratio"] = float(cm["ess_ratio"].mean())
                out["oar/top10_mass"] = float(cm["top10_mass"].mean())
        return out

    # ------------------------------------------------------------------------------------------ eval

    def _prepare_servers(self) -> None:
        """sglang, once per run: the run's own servers up (no ``server_urls``), every server checked, and the
        trainer's weights pushed, so the servers sample from them from the first rollout on (training or oar-eval)."""
        if self.cfg.rollout.engine != "sglang" or self._servers_ready:
            return
        if not self.cfg.rollout.server_urls:
            self.engine.start_local_servers(self.actor)  # no-op when fit() started them already
            self.engine.wait_local_servers()
            inner = self.engine.inner
            self._print(f"sglang: {len(inner.workers)} local server(s) {', '.join(inner.workers)}"
                        + (f" behind router {inner.router_url}" if inner.router_url else "")
                        + (f" ready in {inner.server_start_s:.1f} s" if inner.server_start_s else "")
                        + f"; logs in {self.run_dir / 'sglang'}")
        self.engine.check_servers()
        self.engine.sync_weights(self.actor)
        self._servers_ready = True

    def saliency_probe(self) -> dict[str, float]:
        """OAR saliency precision@k / AUROC against the pivot task's known pivots on the fixed probe set
        (``trainer/saliency_probe.py``), logged under phase ``saliency``; collective (every rank)."""
        if self._probe is None:
            from .saliency_probe import SaliencyProbe
            from .sources import synthetic_task

            self._probe = SaliencyProbe(synthetic_task(self.cfg.data), self.tokenizer,
                                        size=self.cfg.eval.saliency_probe_size,
                                        answer_markers=self.cfg.data.answer_markers, conclude=self.cfg.data.conclude,
                                        pad_id=self.tokenizer.pad_token_id)
        metrics = self._probe.measure(self.actor)
        self.logger.log(self.step, metrics, phase="saliency")
        return metrics

    def evaluate(self) -> dict[str, float]:
        from .evaluate import evaluate

        self._prepare_servers()
        result = evaluate(self.cfg, engine=self.engine, tokenizer=self.tokenizer, reward=self.reward,
                          groups=self.groups, seed=self.cfg.trainer.seed * 31 + self.step)
        self.logger.log(self.step, result.metrics, phase="eval")
        if self.is_logger:
            print(result.table, flush=True)
        return result.metrics


# ---------------------------------------------------------------------------------------------- helpers


def _add_engine_counts(stats: dict[str, float], engine_stats: dict[str, float]) -> None:
    """Sum the sglang engine's call counts into ``stats`` (ENGINE_COUNT_KEYS; nothing for the local engine)."""
    if "rollout/invalid_groups" not in engine_stats:
        return
    for key in ENGINE_COUNT_KEYS:
        stats.setdefault(key, 0.0)
    for key, value in engine_stats.items():
        if key.startswith("rollout/invalid_http_"):
            key = "rollout/invalid_http"
        if key in ENGINE_COUNT_KEYS:
            stats[key] += float(value)


def _step_dir(step: int) -> str:
    return f"step_{step:08d}"


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def _route_spec(cfg):
    """R3 (``rollout.return_routed_experts``): what the servers' routes must look like (every layer is MoE in this
    project's models), or None."""
    from ..rollout.sglang import RouteSpec

    if not cfg.rollout.return_routed_experts:
        return None
    m = cfg.model
    return RouteSpec(num_layers=m.num_layers, topk=m.moe_router_topk, num_experts=m.num_moe_experts)


def _distributed_sync_args(r) -> dict:
    """``SGLangEngine`` arguments of the distributed weight sync: NCCL over the GPU when there is one (gloo on a CPU
    machine), buckets of ``rollout.sync_bucket_mb`` (512 MiB), rank 0 reachable at ``rollout.sync_master_address``
    (loopback when every worker is local, else this host's name)."""
    import socket
    from urllib.parse import urlparse

    import torch

    cuda = torch.cuda.is_available()
    local = all(urlparse(u).hostname in ("127.0.0.1", "localhost", "::1") for u in r.server_urls)
    return {"sync_bucket_mb": r.sync_bucket_mb or 512, "sync_backend": "nccl" if cuda else "gloo",
            "sync_device": f"cuda:{torch.cuda.current_device()}" if cuda else "cpu",
            "sync_master_address": r.sync_master_address or ("127.0.0.1" if local else socket.getfqdn())}
