"""The layout a newcomer reads: no import cycles (between files or between subpackages), short functions,
a docstring per module, a one-import public API that stays light, every module in the README's
table, and the README's Python example runs as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "hybridlm"
MAX_FUNCTION_LINES = 80
SUBPACKAGES = ("model", "lowp", "training", "compress", "serve", "interop", "tasks", "evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(mod: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name `from <node.module> import ...` refers to, from inside `mod`."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the hybridlm modules it imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 40 and graph["hybridlm.training.loop"]  # the graph really holds the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_subpackages_depend_on_each_other_in_one_direction():
    def group(mod: str) -> str:
        parts = mod.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBPACKAGES) else mod

    collapsed: dict[str, set[str]] = {}
    for mod, targets in import_graph().items():
        if mod == "hybridlm":  # the public API imports from everywhere, and nothing imports it
            continue
        collapsed.setdefault(group(mod), set()).update(group(t) for t in targets if group(t) != group(mod))
    for name in collapsed:
        collapsed[name].discard("hybridlm")
    assert set(SUBPACKAGES) <= set(collapsed)
    assert find_cycle(collapsed) is None, f"subpackage cycle: {' -> '.join(find_cycle(collapsed))}"
    assert collapsed["hybridlm.config"] == set() and collapsed["model"] == {"hybridlm.config"}


def test_functions_are_short_and_modules_say_what_they_own():
    long, undocumented = [], []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            undocumented.append(mod)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert not undocumented, f"modules without a docstring: {undocumented}"


def test_every_module_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is inside"):].split("\n## ")[0]
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and p.name not in table]
    assert not missing, f"README module table does not mention {missing}"


def test_import_hybridlm_is_light_and_the_public_api_resolves():
    code = ("import sys, hybridlm; heavy = sorted(m for m in ('torch', 'fastapi', 'matplotlib') if m in sys.modules); "
            "print(heavy); print(sorted(n for n in hybridlm.__all__ if getattr(hybridlm, n, None) is None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"import hybridlm pulled in {out[0]}"
    assert out[1] == "[]", f"public names that do not resolve: {out[1]}"
    import hybridlm
    from hybridlm.interop.convert import load
    from hybridlm.training.loop import train
    assert hybridlm.load is load and hybridlm.train is train  # not the `training` subpackage
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybridlm.nope  # noqa: B018


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.S)[:1]
    assert "from hybridlm import" in example and "train(" in example and "load(" in example
    monkeypatch.chdir(tmp_path)  # the example writes its run under ./runs
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["logits"].shape[-1] == scope["model"].cfg.vocab_size
    assert len(scope["new"]) == 2 and all(len(toks) == 20 for toks in scope["new"])
    assert scope["summary"]["val_loss"] < scope["summary"]["train_loss"] + 1.0
    assert (tmp_path / "runs" / "quick" / "final" / "model.safetensors").is_file()
