"""The package layout stays true: imports point one way down the data flow, with no circle.

Every `import vitune...` in every module is counted, also those inside functions (a lazy import
hides a circle, it does not remove it). Layers, each importing only itself and those it names:

    base (config, conventions, files, presets) <- data, model <- checkpoints <- training, inference
    <- evaluation <- app (cli, quickstart, inspect_data, __main__)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitune"
BASE = {"vitune", "vitune.config", "vitune.conventions", "vitune.files", "vitune.presets"}
APP = {"vitune.cli", "vitune.quickstart", "vitune.inspect_data", "vitune.__main__"}
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "data": {"base", "data"},
    "model": {"base", "model"},
    "checkpoints": {"base", "data", "model", "checkpoints"},
    "training": {"base", "data", "model", "checkpoints", "training"},
    "inference": {"base", "data", "model", "checkpoints", "inference"},
    "evaluation": {"base", "data", "model", "checkpoints", "inference", "evaluation"},
    "serving": {"base", "data", "model", "checkpoints", "inference", "serving"},
    "app": {"base", "data", "model", "checkpoints", "training", "inference", "evaluation", "serving", "app"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod in APP:
        return "app"
    sub = mod.split(".")[1] if mod.count(".") >= 1 else ""
    if sub not in ALLOWED:
        raise AssertionError(f"{mod}: not in any layer of tests/test_layout.py; add it to the table")
    return sub


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """vitune modules imported anywhere in `path` (a `from pkg import name` of a submodule counts)."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vitune"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vitune":
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs or {base}
    return {m for m in out if m != mod}


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_is_in_a_layer_and_has_a_docstring():
    for mod, path in all_modules().items():
        layer(mod)
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: no module docstring"


def test_imports_point_down_the_layers():
    wrong = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
             for m, deps in graph().items() for d in sorted(deps) if layer(d) not in ALLOWED[layer(m)]]
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `g` (a list of modules, first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle({m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph().items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("g, expect", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle_finds_circles(g, expect):
    assert find_cycle(g) == expect


def test_layer_check_catches_a_wrong_import(tmp_path):
    """The walker sees imports inside functions and relative ones (so the tests above can fail)."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..training import train\n    from vitune.inference.generate import generate\n")
    deps = imports_of("vitune.model.fake", fake, set(all_modules()))
    assert deps == {"vitune.training.train", "vitune.inference.generate"}
    assert not {layer(d) for d in deps} <= ALLOWED[layer("vitune.model.fake")]


def test_conventions_shared_by_data_and_model():
    from vitune import conventions
    from vitune.data import chat, packing
    from vitune.model import attention, losses

    assert chat.IGNORE_INDEX == losses.IGNORE_INDEX == conventions.IGNORE_INDEX
    assert packing.PREFIX_SEGMENT == attention.PREFIX_SEGMENT == conventions.PREFIX_SEGMENT
