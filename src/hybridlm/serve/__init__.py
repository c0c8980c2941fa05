"""Inference and serving: sampling, generation, the continuous-batching engine, the OpenAI-compatible server.

    sampling.py    `SamplingParams`, greedy / temperature / top-k / top-p, numerically safe for every value
    generation.py  `generate` (token ids) and `generate_text` (strings): prefill, then decode on the cache
    detokenize.py  incremental detokenization and stop strings
    engine.py      `Engine`: continuous batching, one cache row per request, a background thread
    slots.py       the engine's static-cache slots     decoder.py  prefill + decode steps, eager or compiled
    pick.py        each row's next token (one bad row fails alone)   logprobs.py  log-probs from raw logits
    thinking.py    the thinking budget                 reasoning.py  the <think> reasoning split
    schemas.py     strict OpenAI request models        body.py     reading a body (415 / 413 / 400)
    errors.py      every error, through one path that cannot raise
    chat.py        chat prompts: the checkpoint's template, or a plain one
    routes.py      the generation endpoints            tokenize.py  /tokenize, /detokenize, /tokenizer_info
    relay.py       engine outputs -> JSON or SSE       responses.py  response / chunk / log-prob shapes
    api.py         routes + the OpenAPI document       security.py  API key, CORS, self-contained /docs
    app.py         FastAPI assembly, uvicorn
"""

from .engine import Completion, Engine, QueueFull, Request, RequestOutput
from .generation import generate, generate_text
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "QueueFull", "Request", "RequestOutput", "SamplingParams", "generate",
           "generate_text"]
