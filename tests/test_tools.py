"""tools/inspect_split.py on a tokenizer trained here (nothing downloaded)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.tool_loader import load_tool


def _tool():
    return load_tool("inspect_split")


@pytest.fixture()
def files(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["First add 2 and 3. So the answer is \\boxed{5}.", "Think: 7 - 4 = 3 \\boxed{3}"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    rows = [
        {"response": "First add 2 and 3. So the answer is \\boxed{5}."},
        "not json",
        {"other": 1},
        {"response": "no marker here"},
    ]
    data = tmp_path / "r.jsonl"
    data.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return tmp_path, data


def test_inspect_split_prints_the_split_and_counts_bad_rows(files, capsys):
    tmp, data = files
    assert _tool().main(["--tokenizer", str(tmp), "--input", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "answer '5'" in out and "marker '\\\\boxed{'" in out
    assert "[First add 2 and 3. So the answer is" in out
    assert "marker None" in out  # unmarked response: everything scored
    assert "2 shown, 2 skipped" in out
    assert "line 2: skipped (JSONDecodeError" in err and "line 3: skipped (KeyError" in err


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--tokenizer: no tokenizer.json"):
        _tool().main(["--tokenizer", str(tmp_path), "--input", "x"])
