"""The package's layering, checked by walking every import (module level and inside functions) of src/scalegen.

Each module sits in a layer (by its longest matching name in LAYERS); it may import only its own layer and lower
ones, so the parts know nothing of training, training nothing of the commands, and no import circle can form.
A new module needs a line in LAYERS: the test names it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "scalegen"
MODULES = sorted(SRC.rglob("*.py"))

# low -> high: a module may import modules of its own layer or of a lower one
LAYERS: list[tuple[str, ...]] = [
    ("errors", "io", "hub"),  # leaves: errors, checkpoint I/O, weights files by path / Hub id / release name
    ("schedule", "generation.guidance", "generation.options"),  # value types: schedules, compositions, guidance, options
    ("parts", "tokenizers", "generators", "heads"),  # the part interfaces and the parts
    ("generation", "official", "data"),  # the loop over parts, the official releases, data modules
    ("scaleout.distributed", "scaleout.dcp_metadata", "scaleout.slurm", "tokenizers.train", "eval.metrics",
     "eval.classifier", "eval.fits", "eval.bootstrap", "eval.tokenizer_eval", "eval.figures"),
    ("training",),  # the generator LightningModule, the run folder (lock, metrics, final checkpoint)
    ("checks", "build", "eval.callback", "eval.flops"),  # config checks, config -> objects (Hydra), eval callback, FLOPs
    ("pretrained", "tokenizers.latent_stats", "eval.report", "eval.runs", "eval.comparisons", "eval.scaling",
     "eval.frontier"),  # loading checkpoints; measuring; reporting (the run folders read, its sections)
    ("commands", "scaleout.cache_latents", "scaleout.consolidate"),  # what users run
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


KNOWN = {module_name(p) for p in MODULES}


def layer_of(module: str) -> int:
    """The layer of `scalegen.a.b`: the entry of LAYERS that names the longest prefix of `a.b`."""
    name = module.removeprefix("scalegen").lstrip(".")
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for entry in names:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > best:
                best, found = len(entry), i
    if found is None and module in KNOWN and (SRC.parent / module.replace(".", "/") / "__init__.py").exists():
        found = min((layer_of(m) for m in KNOWN if m.startswith(module + ".")), default=None)  # a package's __init__
    if found is None and name:
        raise LookupError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return -1 if found is None else found  # the package root (__init__) imports nothing


def scalegen_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a scalegen module in the file, at any depth (`from scalegen.eval import
    classifier` counts as scalegen.eval.classifier)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute imports")
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in KNOWN else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in dict.fromkeys(names) if n == "scalegen" or n.startswith("scalegen.")]
    return out




@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_only_lower_layers(path: Path) -> None:
    here = layer_of(module_name(path))
    wrong = [f"line {line}: {mod} (layer {layer_of(mod)}: {LAYERS[layer_of(mod)]})"
             for line, mod in scalegen_imports(path) if layer_of(mod) > here]
    assert not wrong, f"{module_name(path)} (layer {here}: {LAYERS[here]}) imports higher layers: {wrong}"


def test_no_import_circles() -> None:
    """Modules of one layer may import each other; no chain of imports may lead back to where it started."""
    graph = {module_name(p): {m for _, m in scalegen_imports(p)} for p in MODULES}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])


def test_layer_table_detects_a_violation() -> None:
    """The check itself: a part importing the training module would be refused."""
    assert layer_of("scalegen.training.module") > layer_of("scalegen.generators.backbone")
    assert layer_of("scalegen.commands.train") == len(LAYERS) - 1
    with pytest.raises(LookupError, match="no layer"):
        layer_of("scalegen.somewhere_new")
