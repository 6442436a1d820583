"""A tiny Hugging Face tokenizer directory built on the fly (WordLevel over whitespace words, a jinja chat template)."""

from __future__ import annotations

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|system|>", "<|assistant|>",
         "what", "is", "1", "+", "2", "?", "be", "brief", "answer", "the", "question", "Solve", ":", "x"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_hf_tokenizer_dir(path, *, chat_template: bool = True, bos: bool = True) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    kwargs = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if bos:
        kwargs["bos_token"] = "<s>"
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **kwargs)
    hf.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|system|>", "<|assistant|>"]})
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(path))
    return str(path)
