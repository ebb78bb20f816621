"""Dependencies point one way: no import cycle between orthograd's modules, and no import from a lower layer of the
README's architecture into a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import orthograd

SRC = Path(orthograd.__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every orthograd module -> the orthograd modules it imports anywhere (function bodies and TYPE_CHECKING too)."""
    paths = {_module_name(p): p for p in (SRC / "orthograd").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names)
        # a module's own parent packages are loaded before it anyway: not an edge of the module's making
        edges[name] = {t for t in found if t in paths and t != name and not name.startswith(t + ".")}
    return edges


def _cycle_from(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    path, seen = [start], set()

    def walk(node: str) -> list[str] | None:
        for nxt in sorted(edges[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                found = walk(nxt)
                if found:
                    return found
                path.pop()
        return None

    return walk(start)


def test_no_import_cycle() -> None:
    edges = _imports()
    cycles = [cycle for name in edges if (cycle := _cycle_from(name, edges))]
    assert not cycles, f"import cycles: {cycles[:3]}"


# The five layers the README's architecture section draws, by top-level module or package; a module imports only
# from its own layer and the layers above it (lower numbers). A new top-level module must be placed here (and in
# the README) before the suite passes.
LAYERS: dict[int, tuple[str, ...]] = {
    1: ("_version", "runtime", "geometry", "grads", "choices", "io"),  # numerics and runtime
    2: ("tasks", "lora", "stopping", "metrics", "input_checks", "evaluation", "training", "privacy", "wer",
        "attention", "damage", "data", "models"),  # building blocks
    3: ("methods",),  # one module per method
    4: ("api", "results", "narration", "peft_inputs", "audit", "model_folder", "distributed"),  # one run
    5: ("bench", "image_bench", "asr_bench", "llm_bench", "reporting", "plots", "cli", "unlearn_command",
        "data_files", "run_progress", "run_report"),  # experiments and the commands
}
ROOT_LAYER = 5  # the package root re-exports the public API


def _layer(module: str) -> int:
    if module == "orthograd":
        return ROOT_LAYER
    top = module.split(".")[1]
    layers = [n for n, names in LAYERS.items() if top in names]
    assert layers, f"orthograd.{top} is in no layer: add it to LAYERS and to the README's architecture section"
    return layers[0]


def test_every_module_imports_only_from_its_layer_and_the_layers_above() -> None:
    edges = _imports()
    upward = sorted(f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})" for m, targets in edges.items()
                    for t in targets if _layer(t) > _layer(m))
    assert not upward, upward


def test_the_layers_name_each_top_level_module_once() -> None:
    names = [name for names in LAYERS.values() for name in names]
    assert len(names) == len(set(names))
    tops = {m.split(".")[1] for m in _imports() if m != "orthograd"}
    assert tops == set(names), (sorted(tops - set(names)), sorted(set(names) - tops))


BENCHMARK_TASKS = ("orthograd.image_bench", "orthograd.asr_bench", "orthograd.llm_bench")
BELOW_THE_EXPERIMENTS = ("orthograd.distributed", "orthograd.methods", "orthograd.grads", "orthograd.tasks",
                         "orthograd.data", "orthograd.models")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_engine_names_tasks_and_backends_but_imports_none_of_the_tasks() -> None:
    """bench/ finds a task by its row in TASKS and a backend by its row in BACKENDS (module names, imported on use);
    a task package imports the engine, never the other way round."""
    edges = _imports()
    upward = sorted((m, t) for m, targets in edges.items() if _in(m, ("orthograd.bench",))
                    for t in targets if _in(t, (*BENCHMARK_TASKS, "orthograd.cli")))
    assert not upward, upward


def test_the_layers_below_the_experiments_import_no_experiment_code() -> None:
    edges = _imports()
    upward = sorted((m, t) for m, targets in edges.items() if _in(m, BELOW_THE_EXPERIMENTS)
                    for t in targets if _in(t, ("orthograd.bench", *BENCHMARK_TASKS, "orthograd.cli")))
    assert not upward, upward
