"""The collective-device rule, enforced over the source of every ``disco_ds`` module.

Under NCCL every tensor entering a ``torch.distributed`` collective must live on the accelerator;
gloo accepts CPU tensors, so the CPU test suite cannot catch a violation by running. This test
reads the source instead: it builds the package's call graph, finds every function that reaches a
collective (directly, or through package functions), and forbids in those functions what puts a
tensor on the host: ``.cpu()``, a ``"cpu"`` device literal (``torch.device("cpu")``,
``device="cpu"``, ``.to("cpu")``) and a tensor factory without ``device=`` (``torch.zeros``,
``torch.tensor``, ...; the ``*_like`` factories inherit their input's device and are fine). Host
copies for files belong in helpers that no collective follows.

The package is read recursively (``disco_ds/**/*.py``, and the folders ``pyproject.toml`` installs
under ``disco_ds``, such as ``models/`` as ``disco_ds.models``); modules are keyed by their dotted
path inside it ("distributed.exchange", a package's ``__init__`` by the package's: "distributed").
Calls are resolved statically: plain names through enclosing functions, the module's own
definitions and ``from disco_ds... import`` (absolute or relative); ``module.f`` through imported
package modules (``import disco_ds.a.b as m``, ``from disco_ds.a import b``); imported names are
followed through re-exports (a package ``__init__``, a ``from X import *`` facade) to where they are
defined; ``obj.f`` through the receiver's package class where the source names it (``self``,
``super()``, an annotated parameter or local, ``x = Class(...)``, ``self.attr = Class(...)``, a
typed field, or ``x = f(...)`` / ``self.attr = f(...)`` with ``f`` a package function or method
whose return annotation names the class), including overrides in subclasses; and otherwise to every
package method named ``f``, unless ``f`` is a method of tensors, containers or files (``x.read()``
on an unknown ``x`` is a file's).
"""

from __future__ import annotations

import ast
import io
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "disco_ds"

COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_to_all", "all_to_all_single", "all_gather", "all_gather_into_tensor",
    "all_gather_coalesced", "all_gather_object", "all_gather_single", "broadcast", "broadcast_object_list",
    "broadcast_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "reduce_scatter_coalesced", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "inference_all_reduce",
})
"""``torch.distributed`` / ``deepspeed.comm`` calls that move tensors between ranks (``barrier``
moves none)."""

DIST_MODULES = frozenset({"torch.distributed", "deepspeed.comm"})
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "asarray", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor", "sparse_coo_tensor",
})
"""``torch`` factories whose default device is the host; ``*_like`` factories are not listed."""
HOST_ONLY = frozenset({"from_numpy", "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor",
                       "LongTensor", "IntTensor", "ShortTensor", "ByteTensor", "BoolTensor"})
"""``torch`` constructors that always build on the host."""


GENERIC_METHODS = frozenset(
    name for kind in (torch.Tensor, dict, list, set, str, bytes, io.BufferedReader, io.TextIOWrapper)
    for name in dir(kind)
)
"""Method names of tensors, containers and files: a call ``x.read()`` on a receiver of unknown
type is one of these, not a package method that happens to share the name."""


@dataclass
class _Function:
    module: str
    qualname: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    cls: str | None  # ``module.Class`` whose ``self`` the body sees (methods and functions nested in them)
    enclosing: list[str]  # qualnames of the enclosing functions, innermost last
    calls: set[str] = field(default_factory=set)
    direct: bool = False  # calls a collective itself


@dataclass
class _Class:
    key: str  # module.Class
    module: str  # the module's key (module keys are dotted: "distributed.providers")
    bases: list[ast.expr]
    # self.attr -> what is assigned to it: (annotation, None) for a typed field or ``self.attr: X``,
    # (value, the function assigning it) for ``self.attr = value``; every assignment is kept
    attributes: dict[str, list[tuple[ast.expr, _Function | None]]] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # name -> function key


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class _Module:
    """One module's definitions and import aliases.

    ``name`` is the module's key: its dotted path inside the package ("distributed.exchange"), the
    package path for a package's ``__init__`` ("distributed"), and "__init__" for the package's own
    ``__init__``. ``full`` is its importable name ("disco_ds.distributed.exchange")."""

    def __init__(self, name: str, tree: ast.Module, package: str, is_package: bool) -> None:
        self.name = name
        self.full = package if name == "__init__" else f"{package}.{name}"
        self.functions: dict[str, _Function] = {}
        self.classes: dict[str, _Class] = {}
        self.aliases: dict[str, str] = {}  # local name -> dotted target ("torch.distributed", "disco_ds.x.f")
        self.stars: list[str] = []  # modules imported with ``from X import *``
        parent = self.full if is_package else self.full.rpartition(".")[0]  # what ``from . import`` means
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = parent
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for a in node.names:
                    if a.name == "*":
                        self.stars.append(base)
                    else:
                        self.aliases[a.asname or a.name] = f"{base}.{a.name}"
        self._collect(tree.body, prefix="", cls=None, enclosing=[])

    def _collect(self, body: list[ast.stmt], prefix: str, cls: _Class | None, enclosing: list[str]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                c = _Class(f"{self.name}.{prefix}{node.name}", self.name, list(node.bases))
                self.classes[f"{prefix}{node.name}"] = c
                for item in node.body:  # dataclass-style fields
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        c.attributes.setdefault(item.target.id, []).append((item.annotation, None))
                self._collect(node.body, f"{prefix}{node.name}.", c, enclosing)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{node.name}"
                fn = _Function(self.name, qualname, node, cls.key if cls else None, list(enclosing))
                self.functions[qualname] = fn
                if cls is not None and not enclosing:
                    cls.methods[node.name] = f"{self.name}.{qualname}"
                if cls is not None:
                    for sub in ast.walk(node):  # self.attr = value / self.attr: Cls
                        if isinstance(sub, ast.Assign):
                            for target in sub.targets:
                                if isinstance(target, ast.Attribute) and _dotted(target.value) == "self":
                                    cls.attributes.setdefault(target.attr, []).append((sub.value, fn))
                        elif isinstance(sub, ast.AnnAssign):
                            if isinstance(sub.target, ast.Attribute) and _dotted(sub.target.value) == "self":
                                cls.attributes.setdefault(sub.target.attr, []).append((sub.annotation, None))
                self._collect(node.body, f"{qualname}.", cls, [*enclosing, qualname])

    def resolve(self, dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        target = self.aliases.get(head, head)
        return f"{target}.{rest}" if rest else target


def _own_nodes(fn: ast.AST) -> list[ast.AST]:
    """The nodes of a function's body, without those of functions and classes defined inside it."""
    out, stack = [], list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            if isinstance(node, ast.Lambda):
                stack.extend(ast.iter_child_nodes(node))  # a lambda runs as part of its function
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _is_cpu(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] == "cpu"


def _module_names(keys: list[str]) -> dict[str, tuple[str, bool]]:
    """Source key -> (module key, whether it is a package). A package's ``__init__`` may be given
    as "pkg.__init__" or as "pkg"; "__init__" is the package itself. A key that prefixes another
    ("pkg" next to "pkg.mod") is a package too."""
    names = {}
    for key in keys:
        if key != "__init__" and key.endswith(".__init__"):
            names[key] = (key[: -len(".__init__")], True)
        else:
            names[key] = (key, key == "__init__")
    plain = {name for name, _ in names.values()}
    return {key: (name, is_package or any(other.startswith(f"{name}.") for other in plain))
            for key, (name, is_package) in names.items()}


class _Graph:
    """The package's functions, classes and call edges."""

    def __init__(self, sources: dict[str, str], package: str) -> None:
        self.package = package
        self.modules: dict[str, _Module] = {}
        for key, (name, is_package) in _module_names(list(sources)).items():
            self.modules[name] = _Module(name, ast.parse(textwrap.dedent(sources[key])), package, is_package)
        self.by_full = {m.full: m.name for m in self.modules.values()}  # "disco_ds.a.b" -> "a.b"
        self.functions = {f"{m.name}.{q}": f for m in self.modules.values() for q, f in m.functions.items()}
        self.classes = {c.key: c for m in self.modules.values() for c in m.classes.values()}
        self.by_name: dict[str, set[str]] = {}
        for c in self.classes.values():
            for name, key in c.methods.items():
                self.by_name.setdefault(name, set()).add(key)
        self.parents = {c.key: {b for base in c.bases for b in self.class_of(base, self.modules[c.module])}
                        for c in self.classes.values()}
        self._resolving: set[int] = set()  # calls whose result type is being inferred (breaks cycles)
        for mod in self.modules.values():
            for fn in mod.functions.values():
                for node in _own_nodes(fn.node):
                    if isinstance(node, ast.Call):
                        collective, callees = self.targets(mod, fn, node)
                        fn.direct |= collective
                        fn.calls |= callees

    def class_of(self, expr: ast.expr | None, module: _Module) -> set[str]:
        """Package classes an annotation or constructor call names (``X``, ``X | None``, ``"X"``, ``X(...)``)."""
        if expr is None:
            return set()
        if isinstance(expr, ast.Call):
            return self.class_of(expr.func, module)
        if isinstance(expr, ast.BinOp):
            return self.class_of(expr.left, module) | self.class_of(expr.right, module)
        if isinstance(expr, ast.Subscript):
            return self.class_of(expr.slice, module)
        if isinstance(expr, ast.Tuple):
            return {c for e in expr.elts for c in self.class_of(e, module)}
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            try:
                return self.class_of(ast.parse(expr.value, mode="eval").body, module)
            except SyntaxError:
                return set()
        dotted = _dotted(expr)
        if dotted is None:
            return set()
        if f"{module.name}.{dotted}" in self.classes:
            return {f"{module.name}.{dotted}"}
        key = self.package_key(module.resolve(dotted))
        return {key} if key in self.classes else set()

    def package_key(self, target: str, seen: frozenset[tuple[str, str]] = frozenset()) -> str | None:
        """``disco_ds.a.b.name`` -> ``a.b.name``: the key of a package module, or of what it defines,
        following imports (re-exports of a package's ``__init__``, ``from X import *`` facades) to
        where the name is defined. None when ``target`` is not in the package."""
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            name = self.by_full.get(".".join(parts[:i]))
            if name is not None:
                return self._member_key(name, parts[i:], seen)
        return None

    def _member_key(self, name: str, rest: list[str], seen: frozenset[tuple[str, str]]) -> str | None:
        if not rest:
            return name
        module, head, tail = self.modules[name], rest[0], ".".join(rest[1:])
        if head not in module.functions and head not in module.classes and (name, head) not in seen:
            seen = seen | {(name, head)}
            if head in module.aliases:  # imported here: what it names
                target = module.aliases[head]
                return self.package_key(f"{target}.{tail}" if tail else target, seen)
            for star in module.stars:
                key = self.package_key(f"{star}.{'.'.join(rest)}", seen)
                if key is not None and (key in self.functions or key in self.classes or key in self.modules):
                    return key
        return f"{name}.{'.'.join(rest)}"

    def callable_targets(self, key: str | None) -> set[str]:
        if key in self.functions:
            return {key}
        if key in self.classes:
            return self.methods_of({key}, "__init__", ancestors_only=False)
        return set()

    def ancestors(self, cls: str) -> list[str]:
        out, todo = [], [cls]
        while todo:
            c = todo.pop()
            if c not in out:
                out.append(c)
                todo.extend(self.parents.get(c, ()))
        return out

    def methods_of(self, classes: set[str], name: str, ancestors_only: bool) -> set[str]:
        """Method ``name`` as seen from instances of ``classes``: the inherited definition, and (for
        dynamic dispatch) every override in a package subclass."""
        out = set()
        for cls in classes:
            for c in self.ancestors(cls):
                if name in self.classes[c].methods:
                    out.add(self.classes[c].methods[name])
                    break
            if not ancestors_only:
                out |= {self.classes[c].methods[name] for c in self.classes
                        if cls in self.ancestors(c) and name in self.classes[c].methods}
        return out

    def value_classes(self, module: _Module, fn: _Function, value: ast.expr) -> set[str]:
        """Package classes of an assigned value: a constructor call ``X(...)``, or a call of package
        functions or methods whose return annotation names package classes (``-> X | None``)."""
        if not isinstance(value, ast.Call):
            return self.class_of(value, module)
        found = self.class_of(value, module)
        if found or id(value) in self._resolving:
            return found
        self._resolving.add(id(value))
        try:
            for key in self.targets(module, fn, value)[1]:
                callee = self.functions[key]
                if callee.node.name != "__init__":
                    found |= self.class_of(callee.node.returns, self.modules[callee.module])
        finally:
            self._resolving.discard(id(value))
        return found

    def receiver(self, module: _Module, fn: _Function, node: ast.expr) -> set[str] | None:
        """Package classes of a call's receiver; None when unknown."""
        if isinstance(node, ast.Name) and node.id in ("self", "cls") and fn.cls is not None:
            return {fn.cls}
        if isinstance(node, ast.Name):
            scopes = [self.functions[f"{module.name}.{q}"] for q in fn.enclosing] + [fn]
            for scope in reversed(scopes):
                args = scope.node.args
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                    if a.arg == node.id and a.annotation is not None:
                        return self.class_of(a.annotation, module) or None
                found: set[str] = set()
                for sub in _own_nodes(scope.node):
                    if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call) and \
                            any(isinstance(t, ast.Name) and t.id == node.id for t in sub.targets):
                        found |= self.value_classes(module, scope, sub.value)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and \
                            sub.target.id == node.id:
                        found |= self.class_of(sub.annotation, module)
                if found:
                    return found
            return None
        if isinstance(node, ast.Attribute):
            owners = self.receiver(module, fn, node.value)
            if not owners:
                return None
            found = set()
            for cls in owners:
                for c in self.ancestors(cls):
                    assigned = self.classes[c].attributes.get(node.attr)
                    if assigned:
                        for expr, where in assigned:
                            if where is None:
                                found |= self.class_of(expr, self.modules[self.classes[c].module])
                            else:
                                found |= self.value_classes(self.modules[where.module], where, expr)
                        break
            return found or None
        return None

    def targets(self, module: _Module, fn: _Function, call: ast.Call) -> tuple[bool, set[str]]:
        """(is a collective, package functions it may call)."""
        func = call.func
        if isinstance(func, ast.Name):
            for scope in reversed(fn.enclosing + [fn.qualname]):
                if f"{module.name}.{scope}.{func.id}" in self.functions:
                    return False, {f"{module.name}.{scope}.{func.id}"}
            local = self.callable_targets(f"{module.name}.{func.id}")
            if local:
                return False, local
            target = module.resolve(func.id)
            if target.rpartition(".")[0] in DIST_MODULES:
                return func.id in COLLECTIVES, set()
            return False, self.callable_targets(self.package_key(target))
        if not isinstance(func, ast.Attribute):
            return False, set()
        if isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name) and func.value.func.id == "super":
            parents = {p for c in ([fn.cls] if fn.cls else []) for p in self.parents.get(c, ())}
            return False, self.methods_of(parents, func.attr, ancestors_only=True)
        dotted = _dotted(func.value)
        if dotted is not None:
            target = module.resolve(dotted)
            if target in DIST_MODULES:
                return func.attr in COLLECTIVES, set()
            if dotted.split(".")[0] in module.aliases:
                key = self.package_key(f"{target}.{func.attr}")
                if key is not None:  # a package module's function, or a package class's method
                    owners = self.class_of(func.value, module)
                    return False, self.callable_targets(key) | self.methods_of(owners, func.attr, ancestors_only=False)
                if f"{module.name}.{dotted}" not in self.classes:
                    return False, set()  # another library's module or object (torch.x, math.y)
        owners = self.receiver(module, fn, func.value)
        if owners is None:
            owners = self.class_of(func.value, module)  # Class.method(...)
        if owners:
            return False, self.methods_of(owners, func.attr, ancestors_only=False)
        if func.attr in GENERIC_METHODS:
            return False, set()
        return False, set(self.by_name.get(func.attr, ()))


def find_violations(sources: dict[str, str], package: str = "disco_ds") -> list[str]:
    """``module.function:line: what`` for every breach of the rule in ``sources`` (module name ->
    source text, module names dotted and relative to ``package``: "a.b" for ``package/a/b.py``,
    "a.__init__" or "a" for ``package/a/__init__.py``, "__init__" for the package's own)."""
    graph = _Graph(sources, package)
    problems = []
    for key in sorted(reaching_collectives(sources, package, graph)):
        fn = graph.functions[key]
        for node in _own_nodes(fn.node):
            if isinstance(node, ast.Call):
                what = _host_tensor(graph.modules[fn.module], node)
                if what:
                    problems.append(f"{key}:{node.lineno}: {what}")
    return sorted(problems)


def reaching_collectives(sources: dict[str, str], package: str = "disco_ds", graph: _Graph | None = None) -> set[str]:
    """``module.qualname`` of every function that reaches a collective, directly or through package functions."""
    graph = graph or _Graph(sources, package)
    reaching = {k for k, f in graph.functions.items() if f.direct}
    changed = True
    while changed:
        changed = False
        for key, f in graph.functions.items():
            if key not in reaching and f.calls & reaching:
                reaching.add(key)
                changed = True
    return reaching


def _host_tensor(module: _Module, call: ast.Call) -> str | None:
    """Why ``call`` puts a tensor on the host, or None."""
    func = call.func
    dotted = _dotted(func)
    target = module.resolve(dotted) if dotted else ""
    if isinstance(func, ast.Attribute) and func.attr == "cpu" and not call.args:
        return ".cpu()"
    if any(k.arg == "device" and _is_cpu(k.value) for k in call.keywords):
        return 'device="cpu"'
    if target == "torch.device" and call.args and _is_cpu(call.args[0]):
        return 'torch.device("cpu")'
    if isinstance(func, ast.Attribute) and func.attr == "to" and call.args and _is_cpu(call.args[0]):
        return '.to("cpu")'
    name = target.rpartition(".")[2]
    if target.startswith("torch.") and target.count(".") == 1:
        if name in HOST_ONLY:
            return f"torch.{name}(...) (always on the host)"
        passes_kwargs = any(k.arg is None for k in call.keywords)  # **kwargs may carry device=
        if name in FACTORIES and not passes_kwargs and not any(k.arg == "device" for k in call.keywords):
            return f"torch.{name}(...) without device="
    return None


def _package_folders() -> list[tuple[str, Path]]:
    """(module key prefix, folder) of every folder the package installs from: ``disco_ds/`` and
    each ``[tool.setuptools.package-dir]`` entry of ``pyproject.toml`` under ``disco_ds`` (the
    model, ``models/`` installed as ``disco_ds.models``)."""
    folders = [("", PACKAGE)]
    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        mapped = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {})
        for name, folder in sorted(mapped.items()):
            if name.startswith(f"{PACKAGE.name}."):
                folders.append((name[len(PACKAGE.name) + 1 :], ROOT / folder))
    return folders


def _package_sources() -> dict[str, str]:
    """Every module of the package, recursively, keyed by its dotted path inside it
    ("distributed.exchange"; a package's ``__init__`` as "distributed.__init__", the package's own
    as "__init__")."""
    sources = {}
    for prefix, folder in _package_folders():
        for path in sorted(folder.rglob("*.py")):
            parts = [*(prefix.split(".") if prefix else []), *path.relative_to(folder).with_suffix("").parts]
            sources[".".join(parts)] = path.read_text()
    return sources


# ---------------------------------------------------------------------------- the package


def test_every_tensor_entering_a_collective_is_built_on_the_communication_device() -> None:
    problems = find_violations(_package_sources())
    assert not problems, "host tensors in functions that reach a collective:\n" + "\n".join(problems)


def test_the_package_has_collectives_to_check() -> None:
    """The checker sees the package's collectives at all (guards against a silently empty check)."""
    reaching = reaching_collectives(_package_sources())
    for key in ("distributed.exchange._sum_over_ranks", "distributed.exchange._matrix_lmo",
                "distributed.exchange._separable_lmo", "distributed.exchange.matrix_products",
                "distributed.agreement.raise_if_any_failed", "optim.monitor.NormMonitor.measure",
                "optim.scion.Scion.step", "distributed.providers.ReplicatedProvider._skip_first_call",
                "distributed.providers._FlatPartitionProvider.place", "integrations.reshard.save_portable",
                "distributed.tensor_parallel.lift_layout", "distributed.tensor_parallel.gather_tp_shards",
                "trainer.loop._evaluate", "trainer.loop.train"):
        assert key in reaching, key


def test_scion_step_reaches_the_collectives_of_every_provider() -> None:
    """``Scion.step`` calls ``provider.place(...)`` on ``provider = self._provider_for(...)``, typed
    ``-> LayoutProvider``: the call resolves to every provider's override."""
    graph = _Graph(_package_sources(), "disco_ds")
    calls = graph.functions["optim.scion.Scion.step"].calls
    for key in ("distributed.providers.ReplicatedProvider.place", "distributed.providers._FlatPartitionProvider.place",
                "distributed.providers.TensorParallelProvider.place"):
        assert key in calls, (key, sorted(calls))
    reaching = reaching_collectives({}, graph=graph)
    assert {"distributed.providers.ReplicatedProvider.place", "distributed.providers._FlatPartitionProvider.place",
            "distributed.providers.TensorParallelProvider.place"} <= reaching


# ---------------------------------------------------------------------------- the checker can fail

BAD = {
    "comm": """
        import torch
        import torch.distributed as dist

        def all_sum(t):
            dist.all_reduce(t)
            return t

        def direct(x):
            flag = torch.zeros(2)
            dist.all_reduce(flag)
            return flag
    """,
    "user": """
        import torch
        from disco_ds.comm import all_sum
        from disco_ds import comm as C

        def transitive(x):
            return all_sum(x.detach().cpu())

        def via_module(x):
            return C.all_sum(torch.tensor([1.0]))

        def literal(x):
            return all_sum(torch.ones(3, device="cpu")) + all_sum(x.to("cpu")) + torch.empty(1, device=torch.device("cpu"))

        class Opt:
            def step(self, x):
                return self._reduce(torch.from_numpy(x))

            def _reduce(self, t):
                def inner():
                    return all_sum(t)
                return inner()

        def fine(x):
            buf = torch.zeros(3, device=x.device)
            like = torch.zeros_like(x)
            return all_sum(buf) + all_sum(like)

        def no_collective(x):
            return torch.zeros(3).cpu()

        class Channel:
            def read(self, t):
                return all_sum(t)

        class Holder:
            def __init__(self):
                self.channel = Channel()

            def typed_attribute(self):
                return self.channel.read(torch.empty(2))

        def annotated(ch: "Channel | None"):
            return ch.read(torch.ones(1))

        def unknown_receiver_with_a_file_method(f):
            return f.read(), torch.zeros(3)
    """,
}


def test_checker_flags_each_kind_of_breach() -> None:
    problems = find_violations(BAD)
    flagged = {p.split(":")[0] for p in problems}
    assert flagged == {"comm.direct", "user.transitive", "user.via_module", "user.literal", "user.Opt.step",
                       "user.Holder.typed_attribute", "user.annotated"}, problems
    kinds = " ".join(problems)
    for what in (".cpu()", 'device="cpu"', '.to("cpu")', 'torch.device("cpu")', "torch.zeros(...) without device=",
                 "torch.tensor(...) without device=", "torch.from_numpy"):
        assert what in kinds, (what, problems)


BAD_PACKAGE = {
    "net.__init__": """
        from disco_ds.net.comm import all_sum
    """,
    "net.comm": """
        import torch.distributed as dist

        def all_sum(t):
            dist.all_reduce(t)
            return t
    """,
    "net.channels": """
        from .comm import all_sum

        class Channel:
            def read(self, t):
                return t

        class LoudChannel(Channel):
            def read(self, t):
                return all_sum(t)

        def open_channel() -> "Channel":
            return LoudChannel()
    """,
    "facade": """
        from disco_ds.net.channels import *
    """,
    "user.__init__": "",
    "user.helpers": """
        from ..net.comm import all_sum

        def reduce(t):
            return all_sum(t)
    """,
    "user.calls": """
        import torch
        import disco_ds.net.comm as m
        from disco_ds import net
        from disco_ds.net import all_sum
        from disco_ds.facade import Channel, open_channel
        from ..net import comm
        from . import helpers

        def reexported(x):
            return all_sum(torch.zeros(2))

        def module_alias(x):
            return m.all_sum(torch.ones(2))

        def package_attribute(x):
            return net.comm.all_sum(x.cpu())

        def relative(x):
            return comm.all_sum(torch.tensor([1.0]))

        def relative_sibling(x):
            return helpers.reduce(torch.empty(3))

        def returned(x):
            ch = open_channel()
            return ch.read(torch.zeros(3))

        def annotated_local(x, make):
            ch: "Channel | None" = make()
            return ch.read(torch.ones(2))

        class Holder:
            def __init__(self):
                self.channel = open_channel()

            def via_attribute(self, x):
                return self.channel.read(torch.arange(3))

        class Quiet:
            def read(self, t):
                return t

        def open_quiet() -> Quiet:
            return Quiet()

        def quiet(x):
            q = open_quiet()
            return q.read(torch.zeros(3))

        def fine(x):
            return all_sum(torch.zeros(2, device=x.device))
    """,
}
"""Subpackages: re-exports through a package ``__init__``, a ``from X import *`` facade, ``import
a.b as m``, ``from pkg import mod`` then ``mod.sub.f``, relative imports, and receivers typed by the
return annotation of the call that made them (``-> Channel`` covers ``LoudChannel``'s override)."""


def test_checker_follows_subpackages_reexports_and_return_annotations() -> None:
    problems = find_violations(BAD_PACKAGE)
    flagged = {p.split(":")[0] for p in problems}
    assert flagged == {"user.calls.reexported", "user.calls.module_alias", "user.calls.package_attribute",
                       "user.calls.relative", "user.calls.relative_sibling", "user.calls.returned",
                       "user.calls.annotated_local", "user.calls.Holder.via_attribute"}, problems


def test_checker_flags_the_known_offenders_before_their_fix() -> None:
    """The offenders the issue named, as they were written before the fix."""
    before = {
        "distributed": """
            import torch
            import torch.distributed as dist

            def _sum_over_ranks(buf, layout, stats):
                dist.all_reduce(buf, group=layout.group)

            def matrix_products(layout, tensors, vectors, *, transpose, stats):
                device = next((v.device for per_member in vectors for v in per_member.values()), torch.device("cpu"))
                buf = torch.zeros(3, dtype=torch.float32, device=device)
                _sum_over_ranks(buf, layout, stats)
        """,
        "optim": """
            import torch
            import torch.distributed as dist

            class Scion:
                def _check_replicas(self, group):
                    local = torch.zeros(2, dtype=torch.float64)
                    dist.all_reduce(local, op=dist.ReduceOp.MIN, group=group)
        """,
        "train": """
            import torch
            import torch.distributed as dist

            def _mean_over_ranks(value):
                value = value.detach().float().reshape(1).cpu()
                dist.all_reduce(value)
                return float(value)
        """,
    }
    flagged = {p.split(":")[0] for p in find_violations(before)}
    assert flagged == {"distributed.matrix_products", "optim.Scion._check_replicas", "train._mean_over_ranks"}
