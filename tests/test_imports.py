"""Import rules of the layout (ARCHITECTURE §2), checked on every module of the project.

- `app.py` and `assistant/` never import `trainer` (the server and the trainer meet only
  through files under data/; what the server reads of the trainer's state lives in
  assistant/cycles.py and assistant/adapters.py);
- nothing imports `app`, `trainer.__main__` or `assistant.feedback.__main__` (a CLI is a leaf);
- no import cycle among the project's modules (module-level imports);
- the pure modules load without torch, transformers, peft or bitsandbytes;
- `__init__.py` files stay empty.

Run: python -m pytest tests/test_imports.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("assistant", "trainer")
PURE = ("assistant.config", "assistant.feedback", "assistant.feedback.schema", "assistant.feedback.store",
        "assistant.feedback.pairs", "assistant.feedback.export", "assistant.cycles", "trainer.config", "trainer.data",
        "trainer.gate", "assistant.portable", "assistant.backup", "assistant.limits", "assistant.accounts")
MODEL_LIBRARIES = {"torch", "transformers", "peft", "bitsandbytes"}


def modules() -> dict[str, Path]:
    """Every module of the project by dotted name, subpackages (assistant/feedback/) included."""
    found = {"app": REPO / "app.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Project modules `path` imports (`from trainer import gate` counts as trainer.gate)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    known = modules()
    return {n for n in names if n in known and n not in PACKAGES}


def test_every_module_is_checked():
    found = modules()
    assert {"app", "assistant.cycles", "assistant.feedback", "assistant.feedback.pairs", "assistant.feedback.__main__",
            "trainer.gate", "trainer.steps", "trainer.schedule", "trainer.__main__"} <= set(found)


@pytest.mark.parametrize("name", [n for n in modules() if n == "app" or n.startswith("assistant")])
def test_the_server_side_never_imports_the_trainer(name):
    assert not {m for m in imports(modules()[name]) if m.startswith("trainer")}, name


@pytest.mark.parametrize("name", list(modules()))
def test_nothing_imports_the_app_or_the_trainer_cli(name):
    assert not imports(modules()[name]) & {"app", "trainer.__main__", "assistant.feedback.__main__"}, name


def test_no_import_cycles_among_project_modules():
    graph = {name: imports(path, top_level_only=True) for name, path in modules().items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_pure_modules_load_without_model_libraries():
    code = f"import sys; import {', '.join(PURE)}; print(sorted(set({sorted(MODEL_LIBRARIES)!r}) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES + ("tests",))
def test_init_files_stay_empty(package):
    assert (REPO / package / "__init__.py").read_text() == ""
