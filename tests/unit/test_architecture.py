"""The import graph of router/ and serving/, read with `ast` (nothing is imported): no
cycles, and each room imports only the rooms the layout table allows.

The table is DESIGN's "Rooms inside router/" as the code has it, with its deviations
spelled out below rather than hidden: a new edge that breaks it fails here and has to be
either moved where it belongs or added to EXCEPTIONS with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("http", "routing", "providers", "upstreams", "accounting")

# room -> rooms it may import. "config", "errors", "metrics", "runtime", ... are the top
# level modules of router/; "serving" is the other top-level package. Where this differs
# from the DESIGN table:
# - errors: every room raises the one exception tree (the table names it for http,
#   providers and upstreams only; routing and accounting raise it too);
# - config: http reads server limits (body size), upstreams the Timeouts type, serving the
#   deployment settings;
# - http -> providers: an API surface in another shape (Anthropic Messages) translates with
#   its provider-kind module before the gateway routes it;
# - http -> metrics: the /metrics route renders them.
ALLOWED: dict[str, set[str]] = {
    "http": {"routing", "accounting", "providers", "config", "errors", "metrics"},
    "routing": {"providers", "upstreams", "accounting", "config", "errors"},
    "providers": {"config", "errors"},
    "upstreams": {"config", "errors"},
    "accounting": {"config", "errors"},
    "serving": {"config"},
    # The leaves everybody imports import nothing of ours.
    "config": set(),
    "errors": set(),
}

# Type-only imports (under TYPE_CHECKING) a room may make besides: the route factories
# of http/ take the Runtime they read from.
TYPE_ONLY: dict[str, set[str]] = {"http": {"runtime"}}

# Single edges that break the table, each with why it is still there.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("router.routing.gateway", "router.http.inbound"):
        "the gateway reads the body itself (read_json, facts_for): the fast lane and the "
        "routes hand it the ASGI receive, so a request is one call into routing",
    ("router.routing.gateway", "router.http.streaming"):
        "the gateway returns the response; it checks for a stream (EventStream) to tie "
        "the caller's stream slot to its end",
    ("router.routing.batch_scheduler", "router.http.inbound"):
        "a La Plateforme batch job's lines hold their worst case before the job is sent, "
        "sized from facts_for's prompt bound exactly as the gateway sizes a single request",
    ("router.routing.dispatch", "router.http.streaming"):
        "dispatch builds the streamed response (EventStream around a Relay) because what "
        "happens after the first byte (error events, cleanup, usage) is its decision",
    ("router.accounting.recorder", "router.routing.call"):
        "the recorder closes a routing call record (reads the Call, settles its rate "
        "admission) into a ledger row; it lives with the ledgers it writes",
}


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in ("router", "serving"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, bool]]:
    """(imported module, under TYPE_CHECKING) for every import in the file, at any depth
    (a function-level import still runs, just later)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node: ast.AST, type_only: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    yield from walk_stmt(stmt, True)
                for stmt in child.orelse:
                    yield from walk_stmt(stmt, type_only)
            else:
                yield from walk_stmt(child, type_only)

    def walk_stmt(node: ast.AST, type_only: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, type_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), type_only
        else:
            yield from walk(node, type_only)

    yield from walk(ast.parse(path.read_text(), str(path)), False)


def graph(include_type_only: bool, packages: bool = True) -> dict[str, set[str]]:
    """module -> modules whose import it runs. Importing a.b.c runs a/__init__ and
    a/b/__init__ first, so those are edges too (with `packages`), except the packages the
    importer is inside (already initialised by then)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, type_only in _imports(name, path, known):
            if type_only and not include_type_only:
                continue
            parts = target.split(".")
            for i in range(1 if packages else len(parts), len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in known and mod != name and not name.startswith(mod + "."):
                    edges[name].add(mod)
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "serving":
        return "serving"
    if len(parts) > 1 and parts[1] in ROOMS:
        return parts[1]
    return parts[1] if len(parts) > 1 else "router"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    """The reader itself: a function-level import, a package init and a type-only import
    are all found (else the tests below would pass on an empty graph)."""
    edges = graph(include_type_only=True)
    assert "router.routing.gateway" in edges["router.runtime"]
    assert "router.serving" not in edges  # serving is its own top-level package
    assert "serving.engine" in edges["router.cli"]
    assert "router.runtime" in edges["router.http.routes"]  # under TYPE_CHECKING
    assert "router.runtime" not in graph(include_type_only=False)["router.http.routes"]
    # Importing router.providers.mistral runs router/providers/__init__ first.
    assert "router.providers" in edges["router.routing.dispatch"]


def test_no_import_cycles() -> None:
    """Imports under `if TYPE_CHECKING:` are left out: they never run. A cycle made
    `import router.routing.gateway` fail when it came first (http's package init pulled
    in the routes, which import the gateway), and providers' base and mistral imported
    each other from inside functions."""
    assert cycles(graph(include_type_only=False)) == []


def test_rooms_import_only_what_the_layout_allows() -> None:
    """What each module names in its imports (type-only ones included): the package
    inits a deep import runs on the way are the cycle test's business."""
    edges = graph(include_type_only=True, packages=False)
    at_runtime = graph(include_type_only=False, packages=False)
    broken = []
    for source, targets in sorted(edges.items()):
        allowed = ALLOWED.get(room(source))
        if allowed is None:
            continue  # the top level (app, runtime, cli, metrics) may import anything
        for target in sorted(targets):
            if room(target) == room(source) or room(target) in allowed:
                continue
            if target not in at_runtime[source] \
                    and room(target) in TYPE_ONLY.get(room(source), set()):
                continue
            if (source, target) not in EXCEPTIONS:
                broken.append(f"{source} -> {target}")
    assert broken == [], "move it where it belongs, or add it to EXCEPTIONS with a reason"


def test_every_exception_is_still_needed() -> None:
    edges = graph(include_type_only=True, packages=False)
    stale = [pair for pair in EXCEPTIONS if pair[1] not in edges.get(pair[0], set())]
    assert stale == []
