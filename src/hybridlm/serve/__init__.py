"""Inference and serving: sampling, generation, the continuous-batching engine, the OpenAI-compatible server.

    sampling.py    `SamplingParams`, greedy / temperature / top-k / top-p
    generation.py  `generate` (token ids) and `generate_text` (strings): prefill, then decode on the cache
    detokenize.py  incremental detokenization and stop strings
    engine.py      `Engine`: continuous batching, one cache row per request, a background thread
    schemas.py     OpenAI request / response / error shapes     chat.py  chat prompts: the checkpoint's template, or a plain one
    routes.py      the /v1 endpoints                            app.py   FastAPI assembly, uvicorn
"""

from .engine import Completion, Engine, QueueFull, Request, RequestOutput
from .generation import generate, generate_text
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "QueueFull", "Request", "RequestOutput", "SamplingParams", "generate",
           "generate_text"]
