"""`Compiled`: `torch.compile` of a function on first use, with an eager fallback that says why.

Compilation is lazy (it happens on the first call), so that is where it can fail: no
C++ compiler for inductor, an unsupported backend or device, a graph break under
`fullgraph=True`. Then a `RuntimeWarning` names the error and the function runs eagerly
from then on. `compile_seconds` is the wall time of the first call (tracing + code
generation + one run); report it apart from timed steps.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class Compiled:
    """`fn` compiled with `dynamic=False, fullgraph=True`, and either a `mode` (e.g. "reduce-overhead")
    or inductor `options` (e.g. ``{"cpp_wrapper": True}``)."""

    def __init__(self, fn: Callable[..., Any], mode: str | None = None, options: dict | None = None) -> None:
        self.fn, self.mode, self.options = fn, mode, options
        self.compile_seconds = 0.0
        self.fallback_reason: str | None = None
        self._run: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._run is not None:
            return self._run(*args)
        start = time.perf_counter()
        compiled = torch.compile(self.fn, dynamic=False, fullgraph=True, mode=self.mode, options=self.options)
        try:
            out = compiled(*args)
            self._run = compiled
        except Exception as err:  # compiling failed before anything ran: run eagerly
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.fallback_reason = f"{type(err).__name__}: {first}"
            warnings.warn(f"torch.compile failed ({self.fallback_reason}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            self._run = self.fn
            out = self.fn(*args)
        self.compile_seconds = time.perf_counter() - start
        if self.fallback_reason is None:
            log.info("compiled %s in %.1f s", getattr(self.fn, "__name__", "the function"), self.compile_seconds)
        return out


def compile_forward(model: torch.nn.Module) -> Compiled:
    """Make `model(...)` run a compiled forward (with the fallback); returns the `Compiled`."""
    compiled = Compiled(model.forward)
    model.forward = compiled  # instance attribute: nn.Module.__call__ picks it up
    return compiled
