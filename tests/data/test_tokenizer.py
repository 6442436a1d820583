import json

import pytest

from oar_megatron.algorithms.segment import split_response
from oar_megatron.data import load_tokenizer
from oar_megatron.data.synthetic import BOS_ID, EOS_ID, PAD_ID, VOCAB

from .helpers import WORDS, make_hf_tokenizer_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def test_synthetic_tokenizer_ids_and_round_trip():
    tok = load_tokenizer("synthetic")
    assert tok.vocab_size == 24 == len(VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (0, 1, (2,))
    assert tok.encode("0") == [3] and tok.encode("9") == [12]
    assert tok.encode("+=#") == [13, 14, 15]
    assert tok.encode("ah") == [16, 23]
    text = "1+2=ab3#0"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([5, 15, 3, EOS_ID]) == "2#0<eos>"
    assert tok.decode([5, 15, 3, EOS_ID], skip_special_tokens=True) == "2#0"
    assert tok.response_text([16, 15, 4, EOS_ID, 5, PAD_ID]) == "a#1"
    assert tok.prompt_ids("1+2=", chat=False) == [BOS_ID, 4, 13, 5, 14]
    with pytest.raises(ValueError, match="cannot encode"):
        tok.encode("1 x")


def test_synthetic_has_no_chat_template():
    tok = load_tokenizer("synthetic")
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "1+1="}])
    with pytest.raises(ValueError, match="no chat template"):
        tok.prompt_ids("1+1=", chat=True)


def test_wrapper_works_with_segment_split():
    tok = load_tokenizer("synthetic")
    ids = tok.encode("ab1#2") + [EOS_ID]
    split = split_response(ids, tok, answer_markers=("#",), eos_token_ids=tok.eos_token_ids)
    assert (split.reasoning_len, split.content_len, split.answer_text) == (3, 5, "2")


def test_hf_round_trip_and_ids(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.vocab_size == len(WORDS)
    assert tok.eos_token_ids == (2,) and tok.pad_token_id == 0 and tok.bos_token_id == 1
    ids = tok.encode("what is 1 + 2 ?")
    assert ids == [7, 8, 9, 10, 11, 12]  # no BOS / EOS
    assert tok.decode(ids) == "what is 1 + 2 ?"
    assert tok.decode(ids + [2]) == "what is 1 + 2 ? </s>"
    assert tok.response_text(ids + [2, 7]) == "what is 1 + 2 ?"
    assert tok.prompt_ids("what is", chat=False) == [1, 7, 8]


def test_hf_chat_template(hf_dir):
    tok = load_tokenizer(hf_dir)
    msgs = [{"role": "user", "content": "what is 1 + 2 ?"}]
    assert tok.render_chat(msgs) == "<s><|user|> what is 1 + 2 ? <|assistant|>"
    assert tok.apply_chat_template(msgs) == [1, 4, 7, 8, 9, 10, 11, 12, 6]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == [1, 4, 7, 8, 9, 10, 11, 12]
    ids = tok.prompt_ids("what is 1 + 2 ?", system_prompt="be brief", chat=True)
    assert ids == [1, 5, 13, 14, 4, 7, 8, 9, 10, 11, 12, 6]  # no second BOS in chat mode
    assert tok.prompt_ids(msgs, chat=True) == tok.apply_chat_template(msgs)
    # non-chat with messages: contents joined, BOS prepended
    assert tok.prompt_ids(msgs, system_prompt="be brief", chat=False) == [1, 13, 14, 7, 8, 9, 10, 11, 12]
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_hf_without_chat_template_or_bos(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path, chat_template=False, bos=False))
    assert tok.bos_token_id is None
    assert tok.prompt_ids("what is", chat=False) == [7, 8]
    with pytest.raises(ValueError, match="no chat template"):
        tok.prompt_ids("what is", chat=True)


def test_generation_config_eos_ids_are_added(tmp_path):
    path = make_hf_tokenizer_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 2]}))
    assert load_tokenizer(path).eos_token_ids == (2, 6)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="neither 'synthetic' nor an existing local directory"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer
    with pytest.raises(ValueError):
        load_tokenizer("")
