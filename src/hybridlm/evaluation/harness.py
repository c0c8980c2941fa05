"""lm-evaluation-harness, an optional dependency: importing it (or saying how to install it) and its task index.

This module owns :func:`import_lm_eval` (lm_eval, or one ImportError with the install command)
and :func:`task_manager`, the `lm_eval.tasks.TaskManager` over the bundled task YAMLs
(``task_files/``) and the caller's directories, indexing lm-eval's own ~15k task configs (about
20 s) only when a requested task is not among those.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

BUNDLED_TASKS_DIR = Path(__file__).with_name("task_files")
INSTALL_HINT = "pip install 'lm_eval[api]==0.4.13'"


def import_lm_eval() -> ModuleType:
    """The `lm_eval` package; ImportError naming the install command when it is missing."""
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(f"evaluation needs lm-evaluation-harness, which is not installed: {INSTALL_HINT} "
                          f"({err})") from None
    return lm_eval


def include_paths(include_path: str | Path | Sequence[str | Path] | None = None) -> list[str]:
    """The bundled task directory, then the caller's (each must be a directory)."""
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) \
        else list(include_path)
    for p in extra:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"task directory not found: {p}")
    return [str(BUNDLED_TASKS_DIR)] + [str(p) for p in extra]


def task_manager(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None,
                 metadata: dict[str, Any] | None = None) -> Any:
    """A `TaskManager` that knows every name in ``tasks``: the bundled and ``include_path`` tasks,
    plus lm-eval's installed ones when some name is not among those. ValueError naming the unknown
    tasks (with the closest known names) otherwise."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = include_paths(include_path)
    if not tasks:
        raise ValueError("no tasks given")
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        import difflib
        close = sorted({c for name in unknown for c in difflib.get_close_matches(name, manager.all_tasks, n=3)})
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")
    return manager
