"""`convert` carries a checkpoint's chat template files both ways, and the output's Tokenizer finds the template."""

from __future__ import annotations

import json
from pathlib import Path

from hybridlm.interop.checkpoint import save_model
from hybridlm.interop.convert import convert, detect_format
from hybridlm.interop.chat_template import ChatTemplate, load_chat_template
from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer

from helpers import small_model

NANO2_LIKE = Path(__file__).resolve().parents[1] / "data" / "nano2_like_chat_template.jinja"
CONFIG = {"bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|endoftext|>",
          "chat_template": "from the config (chat_template.jinja wins)"}


def test_convert_carries_chat_template_both_ways(tmp_path):
    src = tmp_path / "ours"
    save_model(small_model(), src)
    (src / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    (src / "chat_template.jinja").write_bytes(NANO2_LIKE.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    expected = ChatTemplate(NANO2_LIKE.read_text(encoding="utf-8"), "<|endoftext|>", "<|endoftext|>")
    assert Tokenizer.from_file(src).chat_template == expected

    hf = convert(src, tmp_path / "hf")
    back = convert(hf, tmp_path / "back")
    assert (detect_format(hf), detect_format(back)) == ("hf", "hybridlm")
    for out in (hf, back):
        for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), (out, name)
        assert load_chat_template(out) == expected
        tok = Tokenizer.from_file(out)
        assert tok.chat_template == expected
        messages = [{"role": "user", "content": "Who was first? /no_think"}]
        assert tok.chat_template.render(messages) == expected.render(messages)


def test_convert_carries_a_config_only_template(tmp_path):
    src = tmp_path / "ours"
    save_model(small_model(), src)
    (src / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    named = {**CONFIG, "chat_template": [{"name": "default", "template": "{{ messages | length }}"}]}
    (src / "tokenizer_config.json").write_text(json.dumps(named), encoding="utf-8")
    back = convert(convert(src, tmp_path / "hf"), tmp_path / "back")
    assert not (back / "chat_template.jinja").exists()
    assert Tokenizer.from_file(back).chat_template == ChatTemplate("{{ messages | length }}", "<|endoftext|>",
                                                                   "<|endoftext|>")


def test_convert_carries_nvidia_remote_code_files(tmp_path):
    """A config with `auto_map` keeps it through both conversions, and the *.py files it names travel too."""
    from hybridlm.interop.convert import remote_code_files

    auto_map = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}
    assert remote_code_files(auto_map) == ("configuration_nemotron_h.py", "modeling_nemotron_h.py")
    assert remote_code_files({"AutoModel": "nvidia/repo--modeling_x.X"}) == ("modeling_x.py",)
    assert remote_code_files(None) == ()
    hf = convert(save_model(small_model(), tmp_path / "ours"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    for name in remote_code_files(auto_map):
        (hf / name).write_text(f"# {name}: NVIDIA's remote code\n")
    back = convert(hf, tmp_path / "back")
    again = convert(back, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["auto_map"] == auto_map
    for name in remote_code_files(auto_map):
        assert (again / name).read_text() == f"# {name}: NVIDIA's remote code\n"
