import json

import pytest

from oar_megatron.data import PromptDataset, PromptIterator, SyntheticTask, load_tokenizer

from .helpers import make_hf_tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("synthetic")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


GSM8K = [
    {"question": "1+2=", "answer": "add them\n#### 3"},
    {"question": "2+2=", "answer": "big\n#### 1,204"},
    {"question": "0+0=", "answer": "no final answer here"},
]
MATH = [
    {"problem": "1+1=", "solution": "so it is $\\boxed{\\frac{1}{2}}$ then \\boxed{2}"},
    {"problem": "2+1=", "solution": "nested \\boxed{x^{2}}"},
    {"problem": "1+0=", "solution": "no box"},
]
DAPO = [
    {"prompt": [{"role": "user", "content": "1+2="}], "reward_model": {"ground_truth": "0", "style": "rule"}},
    {"prompt": [{"role": "user", "content": "2+2="}], "reward_model": {"ground_truth": "1", "style": "rule"}},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_gsm8k_layout(tmp_path, tok, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    ds = PromptDataset.from_file(write(tmp_path / f"g.{fmt}", GSM8K), tokenizer=tok, layout="gsm8k")
    assert ds.name == "g"
    assert [r.answer for r in ds] == ["3", "1204"]
    assert [r.prompt_text for r in ds] == ["1+2=", "2+2="]
    assert ds[0].prompt_ids == [1, 4, 13, 5, 14] and ds[1].index == 1
    assert ds.skipped == [(3, "no '####' final answer in the solution")]
    assert ds[1].meta == {"dataset": "g", "row": 2}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math_layout(tmp_path, tok, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    ds = PromptDataset.from_file(write(tmp_path / f"m.{fmt}", MATH), tokenizer=tok, layout="math", name="math500")
    assert [r.answer for r in ds] == ["2", "x^{2}"]  # the LAST boxed, braces balanced
    assert ds.skipped == [(3, "no \\boxed{} answer in the solution")]
    assert ds.name == "math500" and ds[0].meta["dataset"] == "math500"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dapo_math_layout_with_chat_template(tmp_path, hf_tok, fmt):
    write = write_jsonl if fmt == "jsonl" else write_parquet
    rows = [{"prompt": [{"role": "user", "content": "what is 1 + 2 ?"}],
             "reward_model": {"ground_truth": "3", "style": "rule"}},
            {"prompt": [{"role": "user", "content": "x"}],
             "reward_model": {"ground_truth": "34" if fmt == "parquet" else 34}}]  # a parquet column has one type
    ds = PromptDataset.from_file(write(tmp_path / f"d.{fmt}", rows), tokenizer=hf_tok, layout="dapo_math",
                                 chat_template=True, system_prompt="be brief")
    assert [r.answer for r in ds] == ["3", "34"]
    assert ds[0].prompt_text == "<s><|system|> be brief <|user|> what is 1 + 2 ? <|assistant|>"
    assert ds[0].prompt_ids == [1, 5, 13, 14, 4, 7, 8, 9, 10, 11, 12, 6]


def test_dapo_math_without_chat_uses_message_text(tmp_path, tok):
    ds = PromptDataset.from_file(write_jsonl(tmp_path / "d.jsonl", DAPO), tokenizer=tok, layout="dapo_math")
    assert [(r.prompt_text, r.answer) for r in ds] == [("1+2=", "0"), ("2+2=", "1")]


def test_prompt_template_and_custom_keys(tmp_path, hf_tok):
    rows = [{"q": {"text": "1 + 2"}, "gold": "3"}]
    ds = PromptDataset.from_file(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=hf_tok, prompt_key="q.text",
                                 answer_key="gold", prompt_template="what is {prompt} ?", chat_template=True)
    assert ds[0].prompt_text == "<s><|user|> what is 1 + 2 ? <|assistant|>"
    with pytest.raises(ValueError, match="prompt_template"):
        PromptDataset.from_file(str(tmp_path / "c.jsonl"), tokenizer=hf_tok, prompt_key="q.text",
                                answer_key="gold", prompt_template="{question}")


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    rows = [
        {"prompt": "1+2=", "answer": "0"},              # 1 ok
        "{not json",                                     # 2
        {"prompt": "1+2="},                              # 3 missing answer
        {"prompt": "", "answer": "1"},                   # 4 empty prompt
        {"prompt": 5, "answer": "1"},                    # 5 wrong type
        {"prompt": "1+1=", "answer": ["1"]},             # 6 wrong answer type
        {"prompt": "1+1+1+1+1+1=", "answer": "0"},       # 7 too long (13 tokens with BOS)
        {"prompt": "1 + 1", "answer": "2"},              # 8 not encodable by the char tokenizer
        "[1, 2]",                                        # 9 not an object
        {"prompt": "2+2=", "answer": 1},                 # 10 ok, numeric answer
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    ds = PromptDataset.from_file(path, tokenizer=tok, max_prompt_tokens=8)
    assert [r.meta["row"] for r in ds] == [1, 10] and ds[1].answer == "1"
    assert [n for n, _ in ds.skipped] == [2, 3, 4, 5, 6, 7, 8, 9]
    reasons = dict(ds.skipped)
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing key 'answer'"
    assert reasons[4] == "'prompt' is empty"
    assert "expected a str or a list of chat messages" in reasons[5]
    assert "expected a str or a number" in reasons[6]
    assert reasons[7] == "prompt has 13 tokens > max_prompt_tokens=8"
    assert "cannot encode" in reasons[8]
    assert "expected an object" in reasons[9]
    summary = ds.summary()
    assert summary.startswith("bad: 2 prompts, 8 rows skipped (row 2: invalid JSON")
    assert "row 3: missing key 'answer'" in summary and "5 more" in summary


def test_empty_after_skipping_names_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}, "oops"])
    with pytest.raises(ValueError, match="allbad"):
        PromptDataset.from_file(path, tokenizer=tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        PromptDataset.from_file(str(empty), tokenizer=tok)
    with pytest.raises(ValueError, match="not a file"):
        PromptDataset.from_file(str(tmp_path / "missing.jsonl"), tokenizer=tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        PromptDataset.from_file(str(tmp_path / "x.csv"), tokenizer=tok)
    with pytest.raises(ValueError, match="layout"):
        PromptDataset.from_file(path, tokenizer=tok, layout="gsm9k")


# ------------------------------------------------------------------------------------------------------- iterator


def _ds(n=10):
    return PromptDataset.from_synthetic(SyntheticTask(size=n, seed=0))


def _idx(batch):
    return [r.index for r in batch]


def test_iterator_is_deterministic_and_reshuffles_per_epoch():
    ds = _ds(10)
    a = PromptIterator(ds, batch_size=4, seed=3)
    b = PromptIterator(ds, batch_size=4, seed=3)
    batches = [_idx(a.next_batch()) for _ in range(6)]
    assert batches == [_idx(b.next_batch()) for _ in range(6)]
    # drop_last: two batches per epoch of 10, the last 2 records of each epoch are dropped
    assert (a.epoch, a.position) == (2, 8)
    e0 = batches[0] + batches[1]
    e1 = batches[2] + batches[3]
    assert len(set(e0)) == 8 and len(set(e1)) == 8 and e0 != e1
    import torch
    assert e0 == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()[:8]
    assert e1 == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()[:8]
    assert _idx(PromptIterator(ds, batch_size=4, seed=4).next_batch()) != batches[0]


def test_iterator_without_drop_last_crosses_epochs():
    ds = _ds(10)
    it = PromptIterator(ds, batch_size=4, seed=0, shuffle=False, drop_last=False)
    got = [_idx(it.next_batch()) for _ in range(5)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert (it.epoch, it.position) == (2, 0)
    it = PromptIterator(ds, batch_size=4, seed=0, shuffle=False, drop_last=True)
    assert [_idx(it.next_batch()) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert it.epoch == 1


def test_state_dict_resume_reproduces_following_batches():
    ds = _ds(10)
    ref = PromptIterator(ds, batch_size=3, seed=5)
    for _ in range(4):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [_idx(ref.next_batch()) for _ in range(7)]
    resumed = PromptIterator(ds, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert [_idx(resumed.next_batch()) for _ in range(7)] == expected
    with pytest.raises(ValueError, match="seed"):
        PromptIterator(ds, batch_size=3, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        PromptIterator(ds, batch_size=2, seed=5).load_state_dict(state)


def test_shard_gives_contiguous_shares_of_each_global_batch():
    ds = _ds(12)
    full = PromptIterator(ds, batch_size=6, seed=1)
    shards = [PromptIterator(ds, batch_size=6, seed=1).shard(r, 3) for r in range(3)]
    for _ in range(5):
        glob = _idx(full.next_batch())
        parts = [_idx(s.next_batch()) for s in shards]
        assert parts == [glob[0:2], glob[2:4], glob[4:6]]
    assert shards[1].state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="divisible"):
        full.shard(0, 4)
    with pytest.raises(ValueError, match="rank"):
        full.shard(3, 3)


def test_iterator_bad_args():
    ds = _ds(4)
    with pytest.raises(ValueError, match="batch_size"):
        PromptIterator(ds, batch_size=0)
    with pytest.raises(ValueError, match="no batch"):
        PromptIterator(ds, batch_size=5)
    assert len(PromptIterator(ds, batch_size=5, drop_last=False).next_batch()) == 5


def test_chat_template_requested_without_one_is_a_config_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "0"}])
    with pytest.raises(ValueError, match="no chat template"):
        PromptDataset.from_file(path, tokenizer=tok, chat_template=True)
