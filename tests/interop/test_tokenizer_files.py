"""An export's tokenizer: `convert` writes the tokenizer_config.json a bare tokenizer.json needs (transformers'
AutoTokenizer then tokenizes as we do), the directory's tokenizer or the bundled one, special token ids."""

from __future__ import annotations

import json

import pytest

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import save_model
from hybridlm.interop.convert import convert
from hybridlm.interop.tokenizer_files import BUNDLED_TOKENIZER, read_tokenizer_dir, special_token_ids
from hybridlm.model import HybridLM
from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer

from helpers import TINY_MODEL

TEXTS = ["In the beginning God created the heaven and the earth.", "  two  spaces,\n\nnew lines\tand tabs  ",
         "It's 1611; we'll see 12345 numbers!", "naïve café — “quotes” 日本語 🙂", "a<|endoftext|>b"]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{{ eos_token }}"


def source_dir(tmp_path, template: bool = True, **cfg):
    src = tmp_path / "ours"
    save_model(HybridLM(HybridConfig(**{**TINY_MODEL, "max_seq_len": 777, **cfg})), src)
    (src / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    if template:
        (src / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return src


def test_convert_writes_a_tokenizer_config_for_a_bare_tokenizer_json(tmp_path):
    hf = convert(source_dir(tmp_path), tmp_path / "hf", to="hf")
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
                      "pad_token": "<|endoftext|>", "model_max_length": 777, "add_bos_token": False,
                      "add_eos_token": False, "clean_up_tokenization_spaces": False, "chat_template": TEMPLATE}
    back = convert(hf, tmp_path / "back")  # the config now exists in the source: copied as is
    assert (back / "tokenizer_config.json").read_bytes() == (hf / "tokenizer_config.json").read_bytes()
    assert Tokenizer.from_file(back).chat_template.source == TEMPLATE


def test_transformers_auto_tokenizer_loads_the_export_and_tokenizes_as_we_do(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = convert(source_dir(tmp_path), tmp_path / "hf", to="hf")
    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(hf)), Tokenizer.from_file(hf)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token) == (0, 0, None)
    messages = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.chat_template.render(messages) \
        == "<|user|>hi<|endoftext|>"


def test_no_tokenizer_config_without_a_tokenizer_json(tmp_path):
    src = source_dir(tmp_path, template=False)
    (src / "tokenizer.json").unlink()
    hf = convert(src, tmp_path / "hf", to="hf")
    assert not (hf / "tokenizer_config.json").exists()
    tok = read_tokenizer_dir(src)  # what a GGUF export then uses: the bundled tokenizer
    assert tok.backend.to_str() == Tokenizer.from_file(BUNDLED_TOKENIZER).backend.to_str()
    assert (tok.eos_token, tok.chat_template) == (None, None)


def test_read_tokenizer_dir_takes_eos_and_template_from_the_directory(tmp_path):
    src = source_dir(tmp_path)
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = read_tokenizer_dir(src)
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template.source == TEMPLATE
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        read_tokenizer_dir(src)


def test_special_token_ids_prefer_the_tokenizer_eos_and_check_the_range():
    backend = Tokenizer.from_file(DEFAULT_TOKENIZER_PATH).backend
    cfg = HybridConfig(**{**TINY_MODEL, "eos_token_id": 5, "bos_token_id": 7, "pad_token_id": None})
    assert special_token_ids(backend, cfg) == {"bos": 7, "eos": 5, "pad": None}
    assert special_token_ids(backend, cfg, "<|endoftext|>")["eos"] == 0
    with pytest.raises(ValueError, match="EOS token '</s>' is not in the tokenizer's vocabulary"):
        special_token_ids(backend, cfg, "</s>")
    with pytest.raises(ValueError, match="bos_token_id 5000 is outside the tokenizer's 4096-token vocabulary"):
        special_token_ids(backend, cfg.replace(vocab_size=8192, bos_token_id=5000))
