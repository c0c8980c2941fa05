"""`Compiled`: `torch.compile` of a function on first use, with an eager fallback that says why.

Compilation is lazy (it happens on the first call, and again for each new shape), so
that is where it can fail: no C++ compiler for inductor, an unsupported backend or
device, a graph break under `fullgraph=True`, the recompilation limit. Then a
`RuntimeWarning` names the error and the function runs eagerly from then on (dynamo and
inductor fail before anything runs, so the call is simply made again eagerly).
`compile_seconds` is the wall time of the first call (tracing + code generation + one
run); report it apart from timed steps.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)
# What a later call raises when recompiling for a new shape fails (nothing has run yet).
RECOMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


class Compiled:
    """`fn` compiled with `dynamic=False, fullgraph=True`, and either a `mode` (e.g. "reduce-overhead")
    or inductor `options` (e.g. ``{"cpp_wrapper": True}``).

    Each new shape (or model) is one more compilation of the same code; dynamo's limit of
    recompilations per function is raised to at least `RECOMPILE_LIMIT` (a server compiles
    one shape per cache capacity; tests compile many small models).
    """

    RECOMPILE_LIMIT = 64

    def __init__(self, fn: Callable[..., Any], mode: str | None = None, options: dict | None = None) -> None:
        self.fn, self.mode, self.options = fn, mode, options
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, self.RECOMPILE_LIMIT)
        self.compile_seconds = 0.0
        self.fallback_reason: str | None = None
        self._run: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._run is None:
            return self._first_call(*args, **kwargs)
        if self._run is self.fn:
            return self.fn(*args, **kwargs)
        try:
            return self._run(*args, **kwargs)
        except RECOMPILE_ERRORS as err:  # a later recompilation failed (e.g. the recompile limit)
            self._fall_back(err)
            return self.fn(*args, **kwargs)

    def _first_call(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        self._run = torch.compile(self.fn, dynamic=False, fullgraph=True, mode=self.mode, options=self.options)
        try:
            out = self._run(*args, **kwargs)
        except Exception as err:  # compiling failed before anything ran
            self._fall_back(err)
            out = self.fn(*args, **kwargs)
        self.compile_seconds = time.perf_counter() - start
        if self.fallback_reason is None:
            log.info("compiled %s in %.1f s", getattr(self.fn, "__name__", "the function"), self.compile_seconds)
        return out

    def _fall_back(self, err: Exception) -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        self.fallback_reason = f"{type(err).__name__}: {first}"
        warnings.warn(f"torch.compile failed ({self.fallback_reason}); running eagerly", RuntimeWarning, stacklevel=3)
        self._run = self.fn


def compile_forward(model: torch.nn.Module) -> Compiled:
    """Make `model(...)` run a compiled forward (with the fallback); returns the `Compiled`."""
    compiled = Compiled(model.forward)
    model.forward = compiled  # instance attribute: nn.Module.__call__ picks it up
    return compiled
