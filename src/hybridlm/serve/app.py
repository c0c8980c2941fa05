"""The OpenAI-compatible HTTP server: app assembly (FastAPI), `serve` (uvicorn), and a background server for tests.

The engine runs in its own thread, started and stopped with the app; the endpoints are
in `hybridlm.serve.routes` (attached with their OpenAPI document by `hybridlm.serve.api`),
the request models in `hybridlm.serve.schemas`, the errors in `hybridlm.serve.errors`,
the API key / CORS / docs page in `hybridlm.serve.security`.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .api import add_routes
from .engine import Engine
from .errors import add_error_handlers
from .routes import OpenAIRoutes, ServerSettings
from .security import add_docs_page, secure

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]


def create_app(engine: Engine, tokenizer, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine thread on startup and stops it on shutdown."""
    settings = settings or ServerSettings()
    if tokenizer.vocab_size > engine.model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{engine.model.cfg.vocab_size}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="hybridlm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions and chat over one hybrid Mamba-Transformer model.")
    add_error_handlers(app)
    add_routes(app, OpenAIRoutes(engine, tokenizer, settings))
    add_docs_page(app)
    secure(app, settings.api_key, settings.allowed_origins)
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """uvicorn serving `app` on host:port (0 = a free port) in a thread; a context manager.

        with BackgroundServer(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn
        # IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets; without it, every answer on a
        # keep-alive connection waits ~40 ms for the delayed ACK of its headers (Nagle)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
