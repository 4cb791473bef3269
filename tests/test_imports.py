"""The house's floor plan, checked by parsing the imports of every module (lazy imports inside functions too).

- no import cycle in torchchat/;
- ``torch.distributed`` only in torchchat/distributed/ and torchchat/generate/distributed.py;
- no room imports a floor above it: the library (model, checkpoints, tokenizer, chat formats, generate/,
  distributed/) never imports the application (builder, commands, launch/, server/, cli), the launcher
  never imports the CLI, and so on (see STYLE.md's floor plan);
- the model is a plain model: torchchat/model.py imports and names nothing of the CPU fast path (torchchat/cpu
  applies it from outside) nor of distribution;
- `--help`, `generate --help` and a bad flag do not import torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "torchchat"

# Only these may import torch.distributed.
DISTRIBUTED_ALLOWED = ("torchchat.distributed", "torchchat.generate.distributed")

APPLICATION = ("torchchat.builder", "torchchat.commands", "torchchat.launch", "torchchat.server", "torchchat.cli")
LIBRARY = ("torchchat.errors", "torchchat.model", "torchchat.catalog", "torchchat.checkpoint", "torchchat.checkpoints",
           "torchchat.tokenizer", "torchchat.chat_format", "torchchat.cpu", "torchchat.quantize",
           "torchchat.generate", "torchchat.distributed")
# module prefix -> the prefixes it must not import: each floor of the application knows only those below it.
FORBIDDEN = {
    **{lib: APPLICATION for lib in LIBRARY},
    "torchchat.builder": ("torchchat.commands", "torchchat.launch", "torchchat.server", "torchchat.cli"),
    "torchchat.launch": ("torchchat.commands", "torchchat.server", "torchchat.cli"),
    "torchchat.server": ("torchchat.builder", "torchchat.commands", "torchchat.launch", "torchchat.cli"),
    "torchchat.commands": ("torchchat.launch", "torchchat.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported_names(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in it: a name in ``from m import name`` counts as the
    module m.name when that is a module, else as m."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_names(path, name, known) for name, path in mods.items()}


def torchchat_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_imports_are_parsed():
    graph = import_graph()
    assert "torchchat.launch.worker" in graph["torchchat.cli"]  # a lazy import, inside main()
    assert "torchchat.commands" in graph["torchchat.cli"]  # `from torchchat import commands`
    assert "torch.distributed" in graph["torchchat.distributed.process_group"]


def test_no_import_cycle():
    cycle = find_cycle(torchchat_edges(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_torch_distributed_only_in_the_distributed_modules():
    offenders = [(m, i) for m, imports in import_graph().items() for i in imports
                 if is_under(i, "torch.distributed") and not any(is_under(m, a) for a in DISTRIBUTED_ALLOWED)]
    assert not offenders, "torch.distributed imported by " + ", ".join(m for m, _ in offenders)


def test_no_floor_imports_one_above_it():
    offenders = [(m, i) for m, imports in torchchat_edges(import_graph()).items()
                 for prefix, forbidden in FORBIDDEN.items() if is_under(m, prefix)
                 for i in imports if any(is_under(i, f) for f in forbidden)]
    assert not offenders, "imports from a floor above: " + ", ".join(f"{m} -> {i}" for m, i in offenders)


# What torchchat/model.py must not name, even in a comment: the CPU kernels, their slots, device branches and
# DTensor duck typing (torchchat.cpu.install and torchchat/distributed apply those from outside).
NOT_IN_THE_MODEL = ("cpu_kernels", "torchchat.cpu", "torch.ops", "decode_layers", "decode_attention", "device.type",
                    "to_local", "DTensor", "torch.distributed")


def test_the_model_knows_nothing_of_the_cpu_kernels():
    assert import_graph()["torchchat.model"] <= {"torch", "torch.nn", "torch.nn.functional", "math", "dataclasses",
                                                 "__future__", "torchchat.errors"}
    text = (PACKAGE / "model.py").read_text()
    named = [word for word in NOT_IN_THE_MODEL if word in text]
    assert not named, f"torchchat/model.py names {named}"


def test_errors_import_nothing():
    assert import_graph()["torchchat.errors"] == set()


NO_TORCH = """
import sys
from torchchat.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
assert code == {code}, code
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["generate", "--help"], 0), (["chat", "--help"], 0),
                                        (["server", "--help"], 0), (["generate", "--tp", "0"], 2),
                                        (["generate", "--bogus"], 2), (["bogus"], 2)])
def test_help_and_bad_flags_do_not_import_torch(argv, code):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv, code=code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
