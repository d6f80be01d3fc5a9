"""The package's shape (issue 18): no import cycles, imports at the top of modules, functions and files that fit.

Read from the source (AST), never imported, over every module under services/rlhf except the generated
protobuf code (services/rlhf/v1). Every import counts towards a cycle: at module level, inside a function (a cycle
hidden in a function is still a cycle) and under ``if TYPE_CHECKING:`` (a type-only back-reference still ties
the two layers together; a Protocol in the lower module breaks it).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO_ROOT / "services" / "rlhf"
GENERATED = PACKAGE_ROOT / "v1"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500

# An import inside a function is allowed only for these top-level packages: optional extras, absent from some
# installs, imported where the feature is used so the rest of the platform works without them.
OPTIONAL_EXTRAS = {
    "flask",  # labeling web page (extra "labeling")
    "werkzeug",  # ditto
    "matplotlib",  # demo report figures (extra "demo")
    "vaderSentiment",  # demo's gold sentiment scorer (extra "demo")
    "kubernetes",  # rlhf k8s submit (extra "k8s")
    "helm_python",  # ditto
    "text_generation",  # the TGI generation backend's client
    "requests",  # ditto (TGI's info endpoint)
    "psycopg",  # PostgreSQL feedback store
}
# ...and in a command's light module (``cli.py``, the module ``rlhf --help`` imports), any import: a command
# imports the code it runs (torch, transformers, the service) when it runs, so the CLI starts fast.
FAST_PATH_FILES = {"cli.py", "__main__.py"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package outside the generated code."""
    out = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if GENERATED in path.parents:
            continue
        parts = ["rlhf", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads: ``from a import b`` loads ``a.b`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions alike."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = _imported_names(node, name, path.name == "__init__.py")
            if isinstance(node, ast.Import):
                edges.update(n for n in names if n in modules)
                continue
            # `from pkg import submodule` is an edge to the submodule; `from module import attribute` to module
            prefix, attributes = names[0], names[1:]
            edges.update(a for a in attributes if a in modules)
            if prefix in modules and any(a not in modules for a in attributes):
                edges.add(prefix)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle_in(graph, component) for component in components]


def _a_cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_cycle_finder_names_each_cycle_once_from_its_first_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles (imports at module level and inside functions):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_imports_inside_functions_only_for_optional_extras_and_command_fast_paths():
    offenders = []
    for path in _modules().values():
        if path.name in FAST_PATH_FILES:
            continue
        for function in _functions(_tree(path)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    roots = [(node.module or "").split(".")[0] if not node.level else "."]
                else:
                    continue
                for root in roots:
                    if root not in OPTIONAL_EXTRAS:
                        rel = path.relative_to(REPO_ROOT)
                        offenders.append(f"{rel}:{node.lineno} {function.name}() imports {ast.unparse(node)}")
    assert not offenders, (
        f"{len(offenders)} imports inside functions (move them to the module's top; only optional extras "
        f"{sorted(OPTIONAL_EXTRAS)} and {sorted(FAST_PATH_FILES)} may import late):\n" + "\n".join(offenders)
    )


def test_no_function_over_80_lines_and_no_file_over_500_lines():
    offenders = []
    for path in _modules().values():
        rel = path.relative_to(REPO_ROOT)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append((lines, f"{rel}: file of {lines} lines (max {MAX_FILE_LINES})"))
        for function in _functions(_tree(path)):
            length = function.end_lineno - function.lineno + 1
            if length > MAX_FUNCTION_LINES:
                offenders.append(
                    (
                        length,
                        f"{rel}:{function.lineno} {function.name}(): {length} lines (max {MAX_FUNCTION_LINES})",
                    )
                )
    offenders.sort(key=lambda o: -o[0])
    assert not offenders, f"{len(offenders)} too long, longest first:\n" + "\n".join(
        text for _, text in offenders
    )


def _imports_of(path: Path, module: str) -> set[str]:
    """Every dotted name a module imports (module level, in functions and type-only alike)."""
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update(_imported_names(node, module, path.name == "__init__.py"))
    return names


# The pure layer (RL math, rollout tensors, forwards, learner) reads tensors and returns tensors: no job shell,
# no generated protobuf code, no gRPC, no service.
PURE_LAYER = "rlhf.rl"
NOT_IN_PURE_LAYER = (
    "rlhf.trainer",
    "rlhf.v1",
    "grpc",
    "rlhf.generation",
    "rlhf.reward",
    "rlhf.feedback",
    "rlhf.labeling",
    "rlhf.demo",
    "rlhf.k8s",
    "rlhf.bench",
    "rlhf.core.server",
    "rlhf.core.client",
)


def test_the_pure_rl_layer_imports_no_job_shell_grpc_or_service():
    offenders = []
    for module, path in _modules().items():
        if module != PURE_LAYER and not module.startswith(PURE_LAYER + "."):
            continue
        for name in sorted(_imports_of(path, module)):
            if any(name == banned or name.startswith(banned + ".") for banned in NOT_IN_PURE_LAYER):
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not offenders, "the pure layer rlhf.rl must not import these:\n" + "\n".join(offenders)
