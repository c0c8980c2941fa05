"""Small shared builders for the tests."""

import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig, preset
from hybridlm.model import HybridLM

# a ~0.6M-parameter model (M, MLP, attention, MLP) on the default 4096-token vocabulary
TINY_MODEL = dict(vocab_size=4096, d_model=64, pattern="M-*-", n_heads=2, n_kv_heads=1, head_dim=32,
                  ffn_dim=128, ssm_state=16, mamba_head_dim=16, n_groups=1, chunk_size=16)


def small_config(**overrides) -> HybridConfig:
    """All three layer kinds, GQA, 2 groups, chunk smaller than the test sequences."""
    base = dict(vocab_size=97, d_model=64, pattern="M*-M-*M", n_heads=4, n_kv_heads=2, head_dim=16,
                ffn_dim=128, ssm_state=8, mamba_head_dim=16, n_groups=2, chunk_size=8)
    return preset("tiny", **{**base, **overrides})


def small_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(small_config(**overrides))
    with torch.no_grad():  # move the SSM/norm parameters away from their init so tests see them
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "D")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def left_padded_pair(len_a: int, len_b: int, seed: int, vocab: int = 97):
    """Two random prompts a (1, len_a), b (1, len_b < len_a) and their left-padded batch + mask."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, vocab, (1, len_a), generator=gen), torch.randint(0, vocab, (1, len_b), generator=gen)
    ids = torch.zeros(2, len_a, dtype=torch.long)
    ids[0], ids[1, len_a - len_b:] = a[0], b[0]
    mask = torch.ones(2, len_a, dtype=torch.bool)
    mask[1, :len_a - len_b] = False
    return a, b, ids, mask


ALL_ON = dict(qk_norm="layernorm", post_proj_norm="rmsnorm", post_fc2_norm="layernorm",
              mamba_out_norm="rmsnorm", attn_logit_softcap=2.0)


def one_layer(pattern: str, seed: int = 0, **options) -> HybridLM:
    """A float64 model with random (not identity) weights in every norm, including the new ones.

    (Norms compute in float32, as in the reference implementation, hence tolerances of 1e-6.)"""
    torch.manual_seed(seed)
    model = HybridLM(small_config(pattern=pattern, **options)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def ids_for(model: HybridLM, b: int = 2, l: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


# ---- stability options: float64 one-layer models and hand computations ----
def rms(x, w, eps=1e-5):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_of(module, x):
    """The stability norm `module` (RMSNorm or LayerNorm), written out by hand."""
    if hasattr(module, "bias"):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return module.weight * (x - mu) / torch.sqrt(var + 1e-5) + module.bias
    return rms(x, module.weight)


def head_out(model, x):
    return F.linear(rms(x, model.backbone.norm_f.weight), model.lm_head.weight)


# ---- the HTTP server ----
def sse_payloads(lines) -> list:
    """The payloads of a server-sent event stream's ``data:`` lines: parsed JSON objects, then "[DONE]"."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


SERVED_NAME, SERVED_CONTEXT = "tiny-test", 512   # the model behind tests/serve/conftest.py's `server`


def text_model(context: int = 512, seed: int = 1) -> HybridLM:
    """`TINY_MODEL` (the bundled tokenizer's vocabulary) with a `context`-token limit, random weights."""
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(**{**TINY_MODEL, "max_seq_len": context})).eval()


def serving(model, tokenizer, max_batch: int = 8, max_queue: int = 32, **settings):
    """`hybridlm serve` in this process with one intra-op thread (a context manager yielding the
    `BackgroundServer`, its `engine` attached); `settings` are `ServerSettings` fields."""
    from contextlib import contextmanager

    from hybridlm.serve.app import BackgroundServer, ServerSettings, create_app
    from hybridlm.serve.engine import Engine

    @contextmanager
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
            with BackgroundServer(create_app(engine, tokenizer, ServerSettings(**settings))) as srv:
                srv.engine = engine
                yield srv
        finally:
            torch.set_num_threads(threads)
    return run()
