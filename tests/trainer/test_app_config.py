"""oar-train's configuration: the Hydra tree composes into a typed TrainConfig, the real-scale experiment configs
resolve and dry-run, and every bad setting is a one-line error naming the key before any worker starts."""

import subprocess
import sys

import pytest

from oar_megatron.trainer import compose_config
from oar_megatron.trainer.app import run_train
from oar_megatron.trainer.plan import make_plan


def test_default_config_is_the_embedded_run():
    cfg = compose_config()
    assert (cfg.model.name, cfg.algorithm.name, cfg.rollout.engine, cfg.data.path) == ("tiny-synthetic", "oar_g", "local", "synthetic")
    assert cfg.logging.run_dir == "runs/oar_g-seed0"
    plan = make_plan(cfg, 1)
    # 16 prompts x 8 samples = 128 rows; micro-batches of 32 -> 4; one update
    assert (plan.batch.rows, plan.batch.micro_batches, plan.batch.mini_batches) == (128, 4, 1)


def test_overrides_reach_every_group():
    cfg = compose_config(["algorithm=gspo_token_oar_g", "rollout.n_samples=4", "parallel=tp2", "trainer.seed=3",
                          "optim.lr=2e-3"])
    assert cfg.algorithm.loss.name == "gspo_token" and cfg.algorithm.shaper.name == "oar"
    assert (cfg.rollout.n_samples, cfg.parallel.tp, cfg.optim.lr) == (4, 2, 2e-3)
    assert cfg.logging.run_dir == "runs/gspo_token_oar_g-seed3"


@pytest.mark.parametrize("name,world", [("qwen3-8b-oar-g", 64), ("qwen3-30b-a3b-gspo", 128)])
def test_experiment_configs_dry_run(name, world, capsys):
    cfg = compose_config([f"+experiment={name}", "trainer.dry_run=true", f"trainer.world_size={world}"])
    assert run_train(cfg) == 0
    out = capsys.readouterr().out
    assert f"world {world} = " in out and "memory/GPU" in out
    # the sglang engine's servers and timeout are what the plan shows (no URL: the run starts its own server)
    assert "1 local server(s) started by the run, request timeout 1800 s" in out
    plan = make_plan(cfg, world)
    assert plan.batch.rows == 512 * 16 and plan.batch.mini_batches == 4
    assert cfg.optim.lr == 1e-6 and cfg.rollout.temperature == 1.0


def test_memory_estimate_by_hand():
    # tiny-synthetic fp32, no distributed optimizer: 16 bytes per parameter (4 weight + 4 grad + 8 Adam)
    cfg = compose_config()
    plan = make_plan(cfg, 1)
    n = cfg.model.num_params(1)
    gib = 1024**3
    assert plan.memory.params_per_rank == n
    assert plan.memory.weights_gib * gib == pytest.approx(4 * n)
    assert plan.memory.optimizer_gib * gib == pytest.approx(8 * n)
    # ZeRO-1 over 2 data-parallel ranks halves the optimizer bytes (bf16: 12 bytes of master weights + moments)
    cfg = compose_config(["parallel=dp", "model.params_dtype=bfloat16"])
    plan = make_plan(cfg, 2)
    assert plan.memory.optimizer_gib * gib == pytest.approx(12 * n / 2, rel=1e-6)
    assert plan.memory.weights_gib * gib == pytest.approx(2 * n)


@pytest.mark.parametrize("overrides,world,match", [
    (["rollout.prompts_per_step=15"], 1, "trainer.micro_batch_size: 120 rows"),
    (["rollout.prompts_per_step=3"], 2, "rollout.prompts_per_step: 3 prompts do not split evenly over dp=2"),
    (["algorithm.updates_per_batch=3"], 1, "algorithm.updates_per_batch: 4 micro-batches"),
    (["parallel.tp=3"], 3, "parallel.tp: model.num_attention_heads (4) is not divisible by tp (3)"),
    (["parallel.pp=2"], 2, "rollout.engine: the local engine needs parallel.pp=1"),
    (["rollout.n_samples=1", "trainer.micro_batch_size=16"], 1, "rollout.n_samples: group-relative"),
    (["reward.fn=math"], 1, "reward.fn: the synthetic task is scored by 'synthetic_modsum'"),
    (["data.tokenizer=/nonexistent"], 1, "data.tokenizer: the synthetic task has its own tokenizer"),
    (["data.path=prompts.csv"], 1, "data.path: expected 'synthetic' or a .jsonl/.parquet file"),
    (["data=gsm8k", "data.path=gsm8k.jsonl", "data.tokenizer=tok"], 1,
     "reward.fn: gsm8k answers are scored by math-verify (reward=math or reward=dapo)"),
    (["data=gsm8k", "data.path=gsm8k.jsonl", "data.tokenizer=tok", "reward=math"], 1,
     "eval.datasets: 'modsum' is the built-in synthetic task"),
    (["rollout=sglang", "rollout.router_url=http://x:1"], 1, "rollout.router_url: needs rollout.server_urls"),
    (["rollout=sglang", "rollout.server_urls=[http://x:1]", "rollout.local_servers=2"], 1,
     "rollout.local_servers: only read when rollout.server_urls is empty"),
    (["rollout=sglang", "rollout.local_servers=0"], 1, "rollout.local_servers: must be >= 1, got 0"),
    (["rollout.server_python=/x"], 1, "rollout.server_python: only rollout.engine=sglang reads it"),
    (["rollout.server_urls=[http://x:1]"], 1, "rollout.server_urls: only rollout.engine=sglang reads it"),
    (["parallel.cp=2"], 2, "parallel.cp: context parallelism needs model.transformer_impl: transformer_engine"),
    (["parallel.packing=true"], 1, "parallel.packing: THD packing needs model.transformer_impl: transformer_engine"),
    (["rollout.timeout_s=30"], 1, "rollout.timeout_s: only rollout.engine=sglang reads it"),
    (["eval.ks=[1,8]"], 1, "eval.ks: every k must be in [1, eval.k=4], got 8"),
    (["optim.lr=0"], 1, "optim.lr: must be > 0"),
    (["algorithm.loss.name=ppo"], 1, "algorithm.loss.name: unknown value 'ppo'"),
    (["rollout.temperature=0"], 1, "rollout.temperature: training samples need temperature > 0"),
])
def test_bad_configs_fail_with_one_line(overrides, world, match, capsys):
    cfg = compose_config(overrides + ["trainer.dry_run=true", f"trainer.world_size={world}"])
    assert run_train(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err


def test_dr_grpo_normaliser_defaults_to_max_new_tokens():
    # Dr.GRPO's constant length: unset -> the rollout's max_new_tokens, written into the config by validate()
    cfg = compose_config(["algorithm=dr_grpo", "rollout.max_new_tokens=12"])
    cfg.validate(1)
    assert cfg.algorithm.loss.norm_len == 12
    assert cfg.algorithm.loss.build().norm_len == 12
    cfg = compose_config(["algorithm=dr_grpo", "rollout.max_new_tokens=12", "algorithm.loss.norm_len=50"])
    cfg.validate(1)
    assert cfg.algorithm.loss.norm_len == 50  # an explicit constant wins
    cfg = compose_config(["algorithm=grpo"])
    cfg.validate(1)
    assert cfg.algorithm.loss.norm_len is None  # token-mean: no constant needed
    cfg = compose_config(["algorithm=dr_grpo", "algorithm.loss.norm_len=0", "trainer.dry_run=true"])
    with pytest.raises(ValueError, match="^algorithm.loss.norm_len: "):
        cfg.validate(1)


def test_unknown_key_and_wrong_type_are_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="n_sample"):
        compose_config(["rollout.n_sample=3"])
    with pytest.raises(ConfigCompositionException, match="n_samples"):
        compose_config(["rollout.n_samples=many"])


def test_console_script_dry_run_and_bad_config():
    exe = [sys.executable, "-m", "oar_megatron.trainer.app"]
    ok = subprocess.run(exe + ["trainer.dry_run=true"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "layout     world 1 = tp 1" in ok.stdout, ok.stderr
    bad = subprocess.run(exe + ["trainer.dry_run=true", "rollout.prompts_per_step=15"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["oar-train: trainer.micro_batch_size: 120 rows per data-parallel rank "
                                               "(prompts_per_step/dp * n_samples) are not a multiple of "
                                               "micro_batch_size=32"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "oar_megatron.trainer.app", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("overrides,match", [
    # data=gsm8k sets the layout and chat template; its `path: ???` / `tokenizer: ???` do not override the schema's
    # synthetic defaults (OmegaConf keeps a value when MISSING is merged onto it), so the run used to go on with the
    # synthetic tokenizer and end in a traceback at the first OAR scoring batch
    (["data=gsm8k"], "data.path"),
    (["data=math"], "data.path"),
    (["data=gsm8k", "data.path=train.jsonl"], "data.tokenizer"),
])
def test_dataset_group_without_file_or_tokenizer_is_one_line(overrides, match):
    p = _cli(*overrides, "trainer.steps=1")
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"oar-train: {match}:"), p.stderr[-3000:]
    assert "data.tokenizer" in lines[0] and "data.path" in lines[0]


@pytest.mark.parametrize("overrides,hydra_says,line", [
    (["model=foo"], "Could not find 'model/foo'",
     "oar-train: model=foo: unknown option; available: llama3-8b, llama3.1-8b, qwen2.5-0.5b, qwen2.5-1.5b, "
     "qwen2.5-7b, qwen3-0.6b, qwen3-1.7b, qwen3-30b-a3b, qwen3-4b, qwen3-8b, tiny, tiny-moe, tiny-synthetic"),
    (["+experiment=nope"], "Could not find 'experiment/nope'",
     "oar-train: experiment=nope: unknown option; available: pivot, qwen3-30b-a3b-gspo, qwen3-8b-oar-g"),
    (["rollout.n_samples=many"], "could not be converted to Integer",
     "oar-train: rollout.n_samples=many: expects int"),
    (["rollout.temperature=hot"], "could not be converted to Float",
     "oar-train: rollout.temperature=hot: expects float"),
    (["rollout.n_sample=3"], "Key 'n_sample' not in 'RolloutConfig'",
     "oar-train: rollout.n_sample: unknown key; did you mean rollout.n_samples?"),
    (["trainer.steps"], "Error parsing override 'trainer.steps'",
     "oar-train: trainer.steps: not an override; write key=value (trainer.steps=10) or group=option (model=tiny)"),
])
def test_hydra_errors_keep_their_message_and_end_with_the_line_a_user_needs(overrides, hydra_says, line):
    p = _cli(*overrides, "trainer.dry_run=true")
    assert p.returncode == 2, p.stderr[-3000:]
    assert hydra_says in p.stderr
    assert p.stderr.strip().splitlines()[-1] == line, p.stderr[-3000:]
