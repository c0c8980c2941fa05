"""Interchange: our checkpoint format and Hugging Face Nemotron-H directories.

    files.py       atomic writes, safetensors reads with errors that name the file
    checkpoint.py  ours: config.json ({"hybridlm": ...}) + model.safetensors
    hf_config.py   `NemotronHConfig` <-> `HybridConfig`
    hf_weights.py  `NemotronHForCausalLM` weights, single-file or sharded
    convert.py     `load` either format, `convert` between them (and to GGUF)
    gguf.py        `save_gguf`: llama.cpp's nemotron_h GGUF (F32/F16/BF16); gguf_file.py the container,
                   gguf_vocab.py the tokenizer metadata
    tokenizer_files.py  an export's tokenizer: tokenizer.json (else the bundled one), special ids,
                   tokenizer_config.json
    chat_template.py  checkpoints' chat templates: found, rendered in a Jinja sandbox as transformers does
"""

from .checkpoint import load_model, read_config, save_model
from .convert import convert, detect_format, load
from .gguf import save_gguf
from .hf_config import hf_config_to_hybrid, hybrid_to_hf_config, read_hf_config
from .hf_weights import load_hf_dir, save_hf_dir

__all__ = ["convert", "detect_format", "hf_config_to_hybrid", "hybrid_to_hf_config", "load", "load_hf_dir",
           "load_model", "read_config", "read_hf_config", "save_gguf", "save_hf_dir", "save_model"]
