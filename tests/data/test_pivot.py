"""data/pivot.py and its verifier: the trace arithmetic, the response format, the probe rows, and which tokens are
pivotal (changing one changes the reward; changing a filler letter never does)."""

import pytest
import torch

from oar_megatron.data.pivot import PivotTask, pivotal_mask
from oar_megatron.rewards.synthetic import synthetic_pivot


def test_rows_trace_and_reward():
    t = PivotTask(base=3, pivots=2, filler_len=8, size=50, seed=1)
    assert t.trace([2, 2, 1]) == [1, 2] and t.prompt_text([2, 2, 1]) == "2+2+1="
    for row in t.rows():
        ops = [int(x) for x in row["prompt"][:-1].split("+")]
        assert row["answer"] == "".join(map(str, t.trace(ops)))
    assert t.rows() == PivotTask(base=3, pivots=2, filler_len=8, size=50, seed=1).rows()
    assert t.rows()[0]["min_reasoning"] == 10
    assert synthetic_pivot("12abcdefgh#2", "12", min_reasoning=10) == 1.0
    assert synthetic_pivot("12abcdefg#2", "12", min_reasoning=10) == 0.0  # one filler letter short
    assert synthetic_pivot("1abc2defgh#2<eos>", "12") == 1.0  # letters are free, the trace digits in order count
    for bad in ("12abc#1", "21abc#2", "1abc#2", "12a3bc#2", "12abc2", "#2"):
        assert synthetic_pivot(bad, "12") == 0.0, bad


def test_format_and_probe_examples():
    t = PivotTask(base=4, pivots=1, filler_len=64)
    assert t.response_len == 68
    for prompt, resp in t.format_examples(20, torch.Generator().manual_seed(0)):
        text = t.tokenizer.decode(resp[:-1])
        assert len(resp) == 68 and resp[-1] == 2 and text[0].isdigit() and text[-2] == "#" and text[-1] == text[0]
        assert sum(ch.isdigit() for ch in text[:-2]) == 1
    probe = t.probe_examples(10)
    assert probe == t.probe_examples(10)  # fixed rows
    for prompt, resp, pivots in probe:
        ops = [int(x) for x in t.tokenizer.decode(prompt).replace("<bos>", "").strip()[:-1].split("+")]
        text = t.tokenizer.decode(resp[:-1])
        assert pivots == [0] and synthetic_pivot(text, "".join(map(str, t.trace(ops)))) == 1.0
    with pytest.raises(ValueError, match="PivotTask.pivots"):
        PivotTask(pivots=3)


def test_pivotal_tokens_are_exactly_the_ones_that_can_change_the_reward():
    t = PivotTask(base=3, pivots=2, filler_len=6)
    _, resp, pivots = t.probe_examples(1)[0]
    ids = torch.tensor([resp])
    piv = pivotal_mask(ids)[0]
    assert piv.nonzero().flatten().tolist() == pivots
    text = t.tokenizer.decode(resp[:-1])
    answer = "".join(ch for ch in text.split("#")[0] if ch.isdigit())
    assert synthetic_pivot(text, answer) == 1.0
    hash_at = text.index("#")
    for k in range(hash_at):  # another letter for a filler letter, another digit for a trace digit
        repl = str((int(text[k]) + 1) % 3) if text[k].isdigit() else ("a" if text[k] != "a" else "b")
        changed = text[:k] + repl + text[k + 1:]
        assert (synthetic_pivot(changed, answer) == 0.0) == bool(piv[k]), (k, changed)
    no_hash = torch.tensor([[3, 4, 16, 17]])
    assert not pivotal_mask(no_hash).any()
