import pytest
import torch

from oar_megatron.data import PromptDataset, SyntheticTask
from oar_megatron.data.synthetic import EOS_ID, REASONING_CHARS
from oar_megatron.rewards import get_reward


def test_rows_are_deterministic_and_correct():
    task = SyntheticTask(base=3, size=64, seed=7)
    rows = task.rows()
    assert rows == SyntheticTask(base=3, size=64, seed=7).rows()
    assert rows != SyntheticTask(base=3, size=64, seed=8).rows()
    assert len(rows) == 64
    for r in rows:
        assert 0 <= r["a"] < 3 and 0 <= r["b"] < 3
        assert r["prompt"] == f"{r['a']}+{r['b']}="
        assert r["answer"] == str((r["a"] + r["b"]) % 3)
    assert {(r["a"], r["b"]) for r in rows} == {(a, b) for a in range(3) for b in range(3)}  # 64 draws cover 9


def test_answers_by_hand():
    task = SyntheticTask(base=3)
    assert [task.answer(2, 2), task.answer(1, 1), task.answer(2, 1), task.answer(0, 0)] == ["1", "2", "0", "0"]
    assert SyntheticTask(base=10).answer(7, 8) == "5"
    assert task.prompt_ids("2+2=") == [1, 5, 13, 5, 14]
    assert task.conclude == "#" and task.answer_markers == ("#",)


def test_format_examples_parse_to_valid_answers():
    task = SyntheticTask(base=3, reasoning_len=5)
    reward = get_reward("synthetic_modsum")
    tok = task.tokenizer
    examples = task.format_examples(200, torch.Generator().manual_seed(3))
    assert examples == task.format_examples(200, torch.Generator().manual_seed(3))
    digits = []
    for prompt_ids, response_ids in examples:
        assert prompt_ids[0] == tok.bos_token_id and len(response_ids) == task.response_len == 8
        assert response_ids[-1] == EOS_ID
        text = tok.response_text(response_ids)
        assert all(c in REASONING_CHARS for c in text[:5]) and text[5] == "#"
        digit = text[6]
        digits.append(int(digit))
        scores = [reward(text, str(k)) for k in range(3)]
        assert scores == [1.0 if k == int(digit) else 0.0 for k in range(3)]  # exactly one answer matches
    # the answer digit is random, not the right answer: about a third are right
    right = sum(tok.response_text(r)[-1] == SyntheticTask().answer(*map(int, tok.decode(p[1:])[:3:2]))
                for p, r in examples)
    assert 40 < right < 95
    assert set(digits) == {0, 1, 2}


def test_dataset_from_synthetic():
    task = SyntheticTask(size=20, seed=1)
    ds = PromptDataset.from_synthetic(task)
    assert len(ds) == 20 and ds.skipped == []
    for rec, row in zip(ds, task.rows()):
        assert rec.prompt_text == row["prompt"] and rec.answer == row["answer"]
        assert rec.prompt_ids == task.prompt_ids(row["prompt"])
        assert rec.meta["a"] == row["a"] and rec.meta["b"] == row["b"]


@pytest.mark.parametrize("kw", [{"base": 1}, {"base": 11}, {"size": 0}, {"reasoning_len": -1}])
def test_bad_task_args(kw):
    with pytest.raises(ValueError):
        SyntheticTask(**kw)
