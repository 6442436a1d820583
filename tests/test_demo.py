"""oar-demo: the sampler/trainer log-prob identity, every algorithm config runs end to end, and GRPO learns."""

from pathlib import Path

import pytest
import torch

from oar_megatron import demo

ALGOS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "algorithm").glob("*.yaml"))


def test_sampler_respects_allowed_tokens_and_trainer_logp_matches_rollout():
    torch.manual_seed(0)
    model = demo.TinyCausalLM().eval()
    gen = torch.Generator().manual_seed(0)
    prompts, _ = demo.make_prompts(16, gen)
    responses, rollout_logp = demo.sample(model, prompts, gen)
    assert demo.ALLOWED[torch.arange(demo.RESPONSE_LEN), responses].all()
    assert (responses[:, demo.REASONING_LEN] == demo.V.answer).all() and (responses[:, -1] == demo.V.eos).all()
    with torch.no_grad():
        train_logp = demo.response_logp(model, prompts, responses)
    torch.testing.assert_close(train_logp, rollout_logp, atol=1e-5, rtol=0)
    # forced positions have probability 1
    assert torch.allclose(train_logp[:, ~demo.SAMPLED], torch.zeros(()), atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_runs_end_to_end(algo):
    hist = demo.run(demo.DemoConfig(algorithm=algo, steps=2, prompts_per_step=4, group_size=4, eval_prompts=8), quiet=True)
    assert len(hist) == 2
    for m in hist:
        assert 0.0 <= m["reward"] <= 1.0
        assert torch.isfinite(torch.tensor(m["loss"]))
        if "ess_ratio" in m:  # present when some response carried a non-zero advantage
            assert 0.0 < m["ess_ratio"] <= 1.0 + 1e-6 and 0.1 - 1e-6 <= m["top10_mass"] <= 1.0


def test_cli_errors_are_one_line():
    assert demo.main(["algorithm=nope"]) == 2
    with pytest.raises(SystemExit, match="expected key=value"):
        demo.main(["steps"])
    with pytest.raises(SystemExit, match="steps: expected int"):
        demo.main(["steps=many"])


def test_grpo_learns_the_task():
    hist = demo.run(demo.DemoConfig(algorithm="grpo", steps=300, seed=0), quiet=True)
    first = sum(m["reward"] for m in hist[:50]) / 50
    last = sum(m["reward"] for m in hist[-50:]) / 50
    assert last > first + 0.05, (first, last)
