"""The collective-device rule, enforced over the source of every ``disco_ds`` module.

Under NCCL every tensor entering a ``torch.distributed`` collective must live on the accelerator;
gloo accepts CPU tensors, so the CPU test suite cannot catch a violation by running. This test
reads the source instead: it builds the package's call graph, finds every function that reaches a
collective (directly, or through package functions), and forbids in those functions what puts a
tensor on the host: ``.cpu()``, a ``"cpu"`` device literal (``torch.device("cpu")``,
``device="cpu"``, ``.to("cpu")``) and a tensor factory without ``device=`` (``torch.zeros``,
``torch.tensor``, ...; the ``*_like`` factories inherit their input's device and are fine). Host
copies for files belong in helpers that no collective follows.

Calls are resolved statically: plain names through enclosing functions, the module's own
definitions and ``from disco_ds... import``; ``module.f`` through imported package modules;
``obj.f`` through the receiver's package class where the source names it (``self``, ``super()``,
an annotated parameter, ``x = Class(...)``, ``self.attr = Class(...)`` or a typed field), including
overrides in subclasses; and otherwise to every package method named ``f``, unless ``f`` is a
method of tensors, containers or files (``x.read()`` on an unknown ``x`` is a file's).
"""

from __future__ import annotations

import ast
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "disco_ds"

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
    bases: list[ast.expr]
    attributes: dict[str, ast.expr] = field(default_factory=dict)  # self.attr -> annotation or constructor call
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
    """One module's definitions and import aliases."""

    def __init__(self, name: str, tree: ast.Module, package: str) -> None:
        self.name = name
        self.functions: dict[str, _Function] = {}
        self.classes: dict[str, _Class] = {}
        self.aliases: dict[str, str] = {}  # local name -> dotted target ("torch.distributed", "disco_ds.x.f")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = f"{package}.{base}" if base else package
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{base}.{a.name}"
        self._collect(tree.body, prefix="", cls=None, enclosing=[])

    def _collect(self, body: list[ast.stmt], prefix: str, cls: _Class | None, enclosing: list[str]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                c = _Class(f"{self.name}.{prefix}{node.name}", list(node.bases))
                self.classes[f"{prefix}{node.name}"] = c
                for item in node.body:  # dataclass-style fields
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        c.attributes[item.target.id] = item.annotation
                self._collect(node.body, f"{prefix}{node.name}.", c, enclosing)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{node.name}"
                self.functions[qualname] = _Function(self.name, qualname, node, cls.key if cls else None, list(enclosing))
                if cls is not None and not enclosing:
                    cls.methods[node.name] = f"{self.name}.{qualname}"
                if cls is not None:
                    for sub in ast.walk(node):  # self.attr = Cls(...) / self.attr: Cls
                        target, value = None, None
                        if isinstance(sub, ast.Assign) and len(sub.targets) == 1:
                            target, value = sub.targets[0], sub.value
                        elif isinstance(sub, ast.AnnAssign):
                            target, value = sub.target, sub.annotation
                        if isinstance(target, ast.Attribute) and _dotted(target.value) == "self":
                            cls.attributes.setdefault(target.attr, value)
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


class _Graph:
    """The package's functions, classes and call edges."""

    def __init__(self, sources: dict[str, str], package: str) -> None:
        self.package = package
        self.modules = {name: _Module(name, ast.parse(textwrap.dedent(src)), package) for name, src in sources.items()}
        self.functions = {f"{m.name}.{q}": f for m in self.modules.values() for q, f in m.functions.items()}
        self.classes = {c.key: c for m in self.modules.values() for c in m.classes.values()}
        self.by_name: dict[str, set[str]] = {}
        for c in self.classes.values():
            for name, key in c.methods.items():
                self.by_name.setdefault(name, set()).add(key)
        self.parents = {c.key: {b for base in c.bases for b in self.class_of(base, self.modules[c.key.split(".")[0]])}
                        for c in self.classes.values()}
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

    def package_key(self, target: str) -> str | None:
        """``package.module.name`` -> ``module.name`` (following re-exports of the package's __init__)."""
        if not target.startswith(f"{self.package}."):
            return None
        key = target[len(self.package) + 1 :]
        init = self.modules.get("__init__")
        if "." not in key and init is not None and key in init.aliases:
            return self.package_key(init.aliases[key])
        return key

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

    def receiver(self, module: _Module, fn: _Function, node: ast.expr) -> set[str] | None:
        """Package classes of a call's receiver; None when unknown."""
        if isinstance(node, ast.Name) and node.id in ("self", "cls") and fn.cls is not None:
            return {fn.cls}
        if isinstance(node, ast.Name):
            scopes = [self.functions[f"{module.name}.{q}"].node for q in fn.enclosing] + [fn.node]
            for scope in reversed(scopes):
                args = scope.args
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                    if a.arg == node.id and a.annotation is not None:
                        return self.class_of(a.annotation, module) or None
                for sub in _own_nodes(scope):
                    if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in sub.targets):
                        found = self.class_of(sub.value, module) if isinstance(sub.value, ast.Call) else set()
                        if found:
                            return found
            return None
        if isinstance(node, ast.Attribute):
            owners = self.receiver(module, fn, node.value)
            if not owners:
                return None
            found: set[str] = set()
            for cls in owners:
                for c in self.ancestors(cls):
                    expr = self.classes[c].attributes.get(node.attr)
                    if expr is not None:
                        found |= self.class_of(expr, self.modules[c.split(".")[0]])
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
            key = self.package_key(f"{target}.{func.attr}")
            if key is not None and key.split(".")[0] in self.modules and dotted.split(".")[0] in module.aliases:
                return False, self.callable_targets(key) | self.methods_of(self.class_of(func.value, module), func.attr, False)
            if dotted.split(".")[0] in module.aliases and f"{module.name}.{dotted}" not in self.classes:
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
    source text, module names relative to ``package``)."""
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


def _package_sources() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


# ---------------------------------------------------------------------------- the package


def test_every_tensor_entering_a_collective_is_built_on_the_communication_device() -> None:
    problems = find_violations(_package_sources())
    assert not problems, "host tensors in functions that reach a collective:\n" + "\n".join(problems)


def test_the_package_has_collectives_to_check() -> None:
    """The checker sees the package's collectives at all (guards against a silently empty check)."""
    reaching = reaching_collectives(_package_sources())
    for key in ("distributed._sum_over_ranks", "distributed._matrix_lmo", "distributed._separable_lmo",
                "distributed.matrix_products", "distributed.raise_if_any_failed", "monitor.NormMonitor.measure",
                "optim.Scion.step", "optim.Scion._skip_first_call", "optim.Scion._flat_layout",
                "reshard.save_portable", "tensor_parallel.lift_layout", "tensor_parallel.gather_tp_shards",
                "train._evaluate", "train.train"):
        assert key in reaching, key


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
