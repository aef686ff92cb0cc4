"""The import graph of orbitgen's packages: no cycle among their modules, and dependencies point
one way (docs/ARCHITECTURE.md): `models` and `data_shards` import neither `jobs` nor `search`;
`search` never imports `jobs`; inside `jobs`, each room imports only rooms on floors below it. Every import counts, including those inside functions (a lazy import only
hides a cycle). Read with `ast`, nothing is imported."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data_shards", "search", "jobs")
FORBIDDEN = {"models": ("jobs", "search"), "data_shards": ("jobs", "search"), "search": ("jobs",)}
# The rooms of `jobs`, bottom floor first: a room imports only rooms on floors below its own.
JOBS_FLOORS = (
    ("jobs.runtime",),                                   # plumbing: Ray session, console, redaction, env
    ("jobs.spec",),                                      # the job spec
    ("jobs.inputs", "jobs.placement", "jobs.capacity", "jobs.tracking"),   # the driver's checks of inputs, of
    #                                                      where files live and of what fits; MLflow runs, registry
    ("jobs.eval",),                                      # evaluation
    ("jobs.train",),                                     # the training driver, loop, engines, checkpoints
    ("jobs.mineaug", "jobs.doctor", "jobs.generate", "jobs.submit"),   # jobs built on training and evaluation
    ("jobs.cli",),                                       # the commands
)
# Who may import the training driver: the commands, which are the job entry points.
DRIVER, DRIVER_USERS = "jobs.train.driver", ("jobs.cli",)
# Ray's train controller unpickles these and never runs the loop: they stay free of torch and the rest.
THIN_ENTRY = {"jobs.train.config": (), "jobs.train.entry": ("jobs.train.config", "jobs.train.loop")}


@dataclass(frozen=True)
class Edge:
    source: str     # importing module
    target: str     # imported module (of the four packages)
    file: str       # repository-relative path of the importing file
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            parts = path.relative_to(repo).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific known module that `name` (a module, or a module's attribute) names."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path], repo: Path = REPO) -> list[Edge]:
    """The edges from `module` to modules of the packages, one per import statement and target.

    `import a.b.c` and `from a.b import c` point at the most specific module they name (a.b.c
    when it is a module, else a.b); the parent packages they also initialise are not counted, so
    a package's __init__ importing its own submodules is no cycle."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    file = str(path.relative_to(repo))
    edges: list[Edge] = []

    def add(name: str, line: int) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            edges.append(Edge(module, target, file, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                add(f"{prefix}.{alias.name}" if alias.name != "*" else prefix, node.lineno)
    return edges


def import_graph(repo: Path = REPO) -> list[Edge]:
    modules = module_files(repo)
    return [e for m, p in modules.items() for e in imports_of(m, p, modules, repo)]


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges, in order) for every strongly connected component that has one."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
        graph.setdefault(e.target, [])
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            edge = next(it, None)
            if edge is not None:
                nxt = edge.target
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first inside it)."""
    start = min(component)
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for e in sorted(graph[node], key=lambda e: (e.target, e.line)):
                if e.target not in component:
                    continue
                if e.target == start:
                    return paths[node] + [e]
                if e.target not in paths:
                    paths[e.target] = paths[node] + [e]
                    following.append(e.target)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def forbidden(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if e.target.split(".")[0] in FORBIDDEN.get(e.source.split(".")[0], ())]


# --------------------------------------------------------------------------- the checks
def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (every import counts, also inside functions):\n" + "\n".join(
        " -> ".join([c[0].source, *(e.target for e in c)]) + "\n" + "\n".join(f"    {e}" for e in c) for c in cycles)


def test_dependencies_point_one_way():
    bad = forbidden(import_graph())
    assert not bad, ("forbidden import direction (models/data_shards import neither jobs nor search; "
                     "search never imports jobs):\n" + "\n".join(f"    {e}" for e in bad))


def jobs_room(module: str) -> str | None:
    """`jobs.train.loop` -> `jobs.train`; None outside `jobs` and for the package itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "jobs" and len(parts) > 1 else None


def floor_of(room: str) -> int:
    return next(i for i, rooms in enumerate(JOBS_FLOORS) if room in rooms)


def upward(edges: list[Edge]) -> list[Edge]:
    """Imports inside `jobs` from one room into a room on the same or a higher floor."""
    bad = []
    for e in edges:
        source, target = jobs_room(e.source), jobs_room(e.target)
        if source and target and source != target and floor_of(target) >= floor_of(source):
            bad.append(e)
    return bad


def test_every_jobs_module_has_a_room():
    rooms = {r for floor in JOBS_FLOORS for r in floor}
    homeless = sorted({m for m in module_files() if jobs_room(m) and jobs_room(m) not in rooms})
    assert not homeless, f"modules of jobs in no room of JOBS_FLOORS: {homeless}"


def test_jobs_rooms_import_only_downward():
    bad = upward(import_graph())
    assert not bad, "imports inside jobs that reach up or sideways (see JOBS_FLOORS):\n" + "\n".join(
        f"    {e}" for e in bad)


def test_only_the_commands_import_the_training_driver():
    bad = [e for e in import_graph() if e.target == DRIVER and not e.source.startswith(DRIVER_USERS)]
    assert not bad, f"{DRIVER} is imported by:\n" + "\n".join(f"    {e}" for e in bad)


def test_the_ray_train_entry_stays_thin():
    bad = [e for e in import_graph() if e.source in THIN_ENTRY and e.target not in THIN_ENTRY[e.source]]
    assert not bad, "the worker entry imports more than its config and the loop:\n" + "\n".join(f"    {e}" for e in bad)


# --------------------------------------------------------------------------- the walker itself
def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_walker_sees_lazy_relative_and_from_imports(tmp_path):
    write(tmp_path, {
        "models/__init__.py": "",
        "models/a.py": "from models import b\n",
        "models/b.py": "def f():\n    from .c import thing\n",
        "models/c.py": "import models.a as a\nimport os\n",
        "models/sub/__init__.py": "from . import leaf\n",
        "models/sub/leaf.py": "from ..a import x\nimport jobs.tools\n",
        "jobs/__init__.py": "", "jobs/tools.py": "from models.sub import leaf\n",
        "data_shards/__init__.py": "", "search/__init__.py": "from jobs import tools\n",
    })
    edges = import_graph(tmp_path)
    assert {(e.source, e.target) for e in edges} == {
        ("models.a", "models.b"), ("models.b", "models.c"), ("models.c", "models.a"),
        ("models.sub", "models.sub.leaf"), ("models.sub.leaf", "models.a"), ("models.sub.leaf", "jobs.tools"),
        ("jobs.tools", "models.sub.leaf"), ("search", "jobs.tools")}
    cycles = sorted([[str(e) for e in c] for c in find_cycles(edges)], key=len)
    assert cycles[0] == ["jobs/tools.py:1: jobs.tools imports models.sub.leaf",
                         "models/sub/leaf.py:2: models.sub.leaf imports jobs.tools"]
    assert cycles[1] == ["models/a.py:1: models.a imports models.b", "models/b.py:2: models.b imports models.c",
                         "models/c.py:1: models.c imports models.a"]
    assert [str(e) for e in forbidden(edges)] == ["models/sub/leaf.py:2: models.sub.leaf imports jobs.tools",
                                                  "search/__init__.py:1: search imports jobs.tools"]


def test_floor_check_sees_an_import_that_reaches_up(tmp_path):
    write(tmp_path, {
        "jobs/__init__.py": "", "jobs/runtime/__init__.py": "", "jobs/train/__init__.py": "",
        "jobs/runtime/console.py": "def f():\n    from jobs.train import driver\n",
        "jobs/train/driver.py": "from jobs.runtime import console\n",
        "models/__init__.py": "", "data_shards/__init__.py": "", "search/__init__.py": "",
    })
    assert [str(e) for e in upward(import_graph(tmp_path))] == [
        "jobs/runtime/console.py:2: jobs.runtime.console imports jobs.train.driver"]
