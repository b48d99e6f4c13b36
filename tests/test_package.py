"""The package as shipped: what the wheel holds, what importing the core pulls in, and which way the
imports between the layers point.

Proven here:

* The wheel built from this checkout installs one top-level import name, ``disco_ds``; the model
  source kept in the repository's top-level ``models/`` folder lands as ``disco_ds.models``; every
  ``.py`` file of ``disco_ds/`` and ``models/`` is in it (no subpackage forgotten in the explicit
  ``[tool.setuptools] packages`` list); and the model files import only each other, torch,
  transformers and the standard library, so a checkpoint's copy of them loads as remote code.
* In a fresh interpreter, building a :class:`disco_ds.Scion` over every parameter role and stepping
  it imports neither accelerate, deepspeed nor transformers (the optimizer core needs torch only);
  ``import disco_ds.models`` registers ``norm_gpt`` with transformers' Auto classes.
* Statically (``ast``, every import at any depth): ``disco_ds/optim`` and ``disco_ds/distributed``
  never import the integration layers, transformers or accelerate, and import deepspeed only inside
  functions; ``optim/norms.py`` and ``optim/newton_schulz.py`` touch no collective. Each checker is
  run on a violating source first, so a checker that finds nothing cannot pass silently.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "disco_ds"
MODELS = REPO / "models"  # installed as disco_ds.models ([tool.setuptools.package-dir] in pyproject.toml)
MODEL_FILES_IN_WHEEL = (
    "disco_ds/models/__init__.py",
    "disco_ds/models/norm_gpt/configuration_norm_gpt.py",
    "disco_ds/models/norm_gpt/modeling_norm_gpt.py",
)
# What the model files may import besides each other: they are copied next to a checkpoint's
# weights and loaded with trust_remote_code=True where disco_ds may not be installed.
MODEL_IMPORT_ROOTS = frozenset({"torch", "transformers"}) | frozenset(sys.stdlib_module_names)
SUBPROCESS_TIMEOUT = 300


# ---------------------------------------------------------------------------- helpers: the wheel


def repo_python_files() -> set[str]:
    """Every ``.py`` file the wheel must hold, as wheel paths: ``disco_ds/**`` as is and
    ``models/**`` mapped under ``disco_ds/models/``; ``__pycache__`` left out."""
    expected = {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {"disco_ds/models/" + p.relative_to(MODELS).as_posix()
                 for p in MODELS.rglob("*.py") if "__pycache__" not in p.parts}
    return expected


def clean_source_tree(dest: Path) -> Path:
    """A copy of what the build reads (pyproject, readme, the two source folders) in ``dest``.

    Why a copy: setuptools builds in the source tree and never empties ``build/lib``, so building
    in the checkout would both litter it (``build/``, ``*.egg-info``) and let stale files from an
    earlier build (e.g. a module since deleted) hide a subpackage missing from ``packages``.
    """
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(PACKAGE, dest / "disco_ds", ignore=ignore)
    shutil.copytree(MODELS, dest / "models", ignore=ignore)
    return dest


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel of this checkout with the venv's own setuptools (no isolation, no index)
    and return its path."""
    src = clean_source_tree(tmp_path / "src")
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out)],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


# ---------------------------------------------------------------------------- helpers: imports


@dataclass(frozen=True)
class Import:
    """One import statement (or ``importlib.import_module("...")`` call) found in a source."""

    names: tuple[str, ...]
    """Absolute dotted names it may load: ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (``c``
    may be a submodule)."""
    line: int
    module_level: bool
    """Runs when the module is imported: not inside a function body (class bodies and top-level
    ``if``/``try`` blocks do run)."""
    level: int = 0
    """Leading dots of a relative import; 0 for absolute."""
    text: str = ""
    module: str | None = None
    """``from <module> import …`` as written (without the dots); None for ``import a, b``."""
    aliases: tuple[str, ...] = ()
    """The imported names as written (``import a, b`` or ``from m import a, b``)."""


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    """``from <level dots><module>`` seen inside ``package``, as an absolute dotted name."""
    parts = package.split(".") if package else []
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def find_imports(source: str, package: str) -> list[Import]:
    """Every import in ``source`` at any depth (functions, ``if TYPE_CHECKING:``, ``try``), with
    relative imports resolved against ``package`` (the dotted package the module lives in).

    ``if TYPE_CHECKING:`` imports are reported too: they are a dependency of the source even if
    they do not run.
    """
    tree = ast.parse(source)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        text = (ast.get_source_segment(source, node) or "") if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)) else ""
        if isinstance(node, ast.Import):
            aliases = tuple(a.name for a in node.names)
            found.append(Import(aliases, node.lineno, not in_function, 0, text, None, aliases))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(package, node.level, node.module) if node.level else (node.module or "")
            aliases = tuple(a.name for a in node.names)
            names = (base, *(f"{base}.{a}" for a in aliases if a != "*"))
            found.append(Import(names, node.lineno, not in_function, node.level, text, node.module, aliases))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (ast.unparse(node.func) in {"importlib.import_module", "import_module", "__import__"})):
            # A dynamic import with a literal name is the same dependency spelled differently.
            found.append(Import((node.args[0].value,), node.lineno, not in_function, 0, text))
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return found


def matches(name: str, prefixes: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# The core's import direction (see the module docstring): optim and distributed sit below
# everything else in the package and must stay importable with torch alone.
CORE_FORBIDDEN_ANYWHERE = (
    "disco_ds.integrations", "disco_ds.hf", "disco_ds.trainer", "disco_ds.data", "disco_ds.models",
    "disco_ds.cli", "transformers", "accelerate",
)
CORE_FORBIDDEN_AT_MODULE_LEVEL = ("deepspeed",)
# The mathematics (the LMOs and Newton–Schulz) must be checkable on one process.
MATH_MODULES = ("disco_ds/optim/norms.py", "disco_ds/optim/newton_schulz.py")
MATH_FORBIDDEN = ("torch.distributed", "disco_ds.distributed")


def core_violations(source: str, module: str, package: str, math_only: bool = False) -> list[str]:
    """Breaches of the core's import rules in ``source`` (module ``module`` in ``package``), one
    ``"module:line: import … -> name (rule)"`` line each; ``math_only`` adds the no-collective rule."""
    out = []
    for imp in find_imports(source, package):
        for name in imp.names:
            if matches(name, CORE_FORBIDDEN_ANYWHERE):
                rule = "the core must not import the layers above it or transformers/accelerate"
            elif imp.module_level and matches(name, CORE_FORBIDDEN_AT_MODULE_LEVEL):
                rule = "deepspeed only inside functions (import the core with torch alone)"
            elif math_only and matches(name, MATH_FORBIDDEN):
                rule = "the mathematics reads no collective"
            else:
                continue
            out.append(f"{module}:{imp.line}: {imp.text!r} -> {name} ({rule})")
            break
    if math_only:
        # Spelled without an import (``torch.distributed.all_reduce(...)`` after ``import torch``).
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and matches(ast.unparse(node), ("torch.distributed",)):
                out.append(f"{module}:{node.lineno}: {ast.unparse(node)!r} (the mathematics reads no collective)")
                break
    return out


def model_file_violations(source: str, path: str, siblings: set[str]) -> list[str]:
    """Imports in a model file other than torch, transformers, the standard library and its
    sibling files/subpackages (``siblings``: names next to it in the same folder), one line each."""
    out = []
    for imp in find_imports(source, package=""):
        if imp.level == 0:
            # `import a, b` loads every alias; `from m import x` loads m (first of imp.names).
            loaded = imp.aliases if imp.module is None else imp.names[:1]
            bad = [n for n in loaded if n.split(".")[0] not in MODEL_IMPORT_ROOTS]
        elif imp.level == 1:
            # `from .x import y` or `from . import x`: x must be next to this file, since remote
            # code is a flat folder of copied files.
            targets = [imp.module.split(".")[0]] if imp.module else list(imp.aliases)
            bad = [t for t in targets if t not in siblings]
        else:
            bad = [imp.text]  # `from ..` reaches outside the folder a checkpoint copies
        if bad:
            out.append(f"{path}:{imp.line}: {imp.text!r} -> {bad}")
    return out


def run_fresh(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter from ``cwd`` (not the repository root, so only the
    installed ``disco_ds`` is importable) and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- 1. the wheel


def test_wheel_holds_one_package_with_every_module(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        entries = z.namelist()
        top_level_txt = [n for n in entries if n.endswith(".dist-info/top_level.txt")]
        top_level = z.read(top_level_txt[0]).decode().split() if top_level_txt else None
        model_sources = {n: z.read(n).decode() for n in entries if n.startswith("disco_ds/models/") and n.endswith(".py")}

    # A top-level `models` (or anything else) would collide with other projects' packages.
    roots = {n.split("/")[0] for n in entries if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"disco_ds"}, f"top-level names in {wheel.name}: {sorted(roots)}"
    if top_level is not None:
        assert top_level == ["disco_ds"], f"top_level.txt lists {top_level}"
    for path in MODEL_FILES_IN_WHEEL:
        assert path in entries, f"{path} missing from {wheel.name}"

    expected = repo_python_files()
    shipped = {n for n in entries if n.endswith(".py")}
    assert not expected - shipped, (
        f"in the repository but not in the wheel (a subpackage missing from [tool.setuptools] packages?): "
        f"{sorted(expected - shipped)}")
    assert not shipped - expected, f"in the wheel but not in the repository: {sorted(shipped - expected)}"

    # The model files as shipped must stay loadable as remote code.
    problems = []
    for path, source in sorted(model_sources.items()):
        folder = path.rsplit("/", 1)[0] + "/"
        siblings = {n[len(folder):].split("/")[0].removesuffix(".py") for n in model_sources if n.startswith(folder)}
        problems += model_file_violations(source, path, siblings)
    assert not problems, "model files import outside torch/transformers/the stdlib/each other:\n" + "\n".join(problems)


def test_model_import_checker_catches_a_violation() -> None:
    """Negative control for the remote-code check above."""
    source = "import math\nimport torch\nfrom .modeling import X\n" \
             "def f():\n    from disco_ds.optim import Scion\n    from ..other import y\n    import numpy\n"
    problems = model_file_violations(source, "m.py", {"modeling"})
    assert [p.split(":")[1] for p in problems] == ["5", "6", "7"], problems


# ---------------------------------------------------------------------------- 2. fresh interpreters

_SCION_SCRIPT = r"""
import json, sys
import torch
from torch import nn
from disco_ds import Scion, scion_param_groups

class Tiny(nn.Module):
    # nn.Embedding -> embedding; hidden.weight (2-D) -> hidden; lm_head.weight (OUTPUT_NAME_PATTERN)
    # -> output; the biases and LayerNorm -> vector.
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 16, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(torch.relu(self.hidden(self.wte(ids)))))

torch.manual_seed(0)
model = Tiny()
groups = scion_param_groups(model, lr=0.01)
optimizer = Scion(groups)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
for _ in range(2):
    ids = torch.randint(0, 16, (4, 5))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(json.dumps({
    "roles": sorted(g["role"] for g in groups),
    "steps": optimizer.steps,
    "moved": sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n])),
    "loaded": {m: m in sys.modules for m in ("accelerate", "deepspeed", "transformers.trainer", "transformers")},
}))
"""


def test_scion_core_needs_torch_only(tmp_path: Path) -> None:
    """Building and stepping Scion loads none of accelerate, deepspeed, transformers.trainer, nor
    transformers at all: the optimizer core needs torch only (the discarded-optimizer watch reads
    what DeepSpeed attaches to parameters without importing it)."""
    result = run_fresh(_SCION_SCRIPT, tmp_path)
    assert result["roles"] == ["embedding", "hidden", "output", "vector"]  # every role exercised
    assert result["steps"] == 2
    assert len(result["moved"]) == 6, result["moved"]  # every parameter updated
    loaded = [m for m, present in result["loaded"].items() if present]
    assert not loaded, f"Scion(...) + step() imported {loaded}"


def test_models_import_registers_norm_gpt(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import disco_ds\n"
        "plain = 'transformers' in sys.modules\n"
        "import disco_ds.models\n"
        "import transformers\n"
        "config = transformers.AutoConfig.for_model('norm_gpt')\n"
        "print(json.dumps({'plain': plain, 'config': type(config).__module__ + '.' + type(config).__name__,"
        " 'model_type': config.model_type}))\n"
    )
    result = run_fresh(code, tmp_path)
    assert result["plain"] is False, "`import disco_ds` imported transformers"
    assert result["model_type"] == "norm_gpt"
    assert result["config"] == "disco_ds.models.norm_gpt.configuration_norm_gpt.NormGPTConfig"


# ---------------------------------------------------------------------------- 3. import direction


def core_modules() -> list[Path]:
    """The source files of the optimizer core and its distributed layer."""
    files = sorted([*(PACKAGE / "optim").rglob("*.py"), *(PACKAGE / "distributed").rglob("*.py")])
    return [f for f in files if "__pycache__" not in f.parts]


def test_core_import_checker_catches_violations() -> None:
    """Negative control: each rule fires on a source that breaks it, wherever the import hides."""
    source = (
        "import torch\n"
        "from typing import TYPE_CHECKING\n"
        "try:\n    import deepspeed\nexcept ImportError:\n    pass\n"  # line 4: module level
        "def late():\n"
        "    import deepspeed.comm\n"  # line 8: inside a function, allowed
        "    from ..hf import watch_for_replacement\n"  # line 9: relative -> disco_ds.hf
        "    from disco_ds import trainer\n"  # line 10: submodule via from-import
        "    importlib.import_module('transformers')\n"  # line 11: dynamic
        "def dist():\n    return torch.distributed.get_rank()\n"  # line 13: math-only, by attribute
        "from torch import distributed\n"  # line 14: math-only
    )
    found = core_violations(source, "x.py", "disco_ds.optim", math_only=True)
    lines = sorted(int(v.split(":")[1]) for v in found)
    assert lines == [4, 9, 10, 11, 13, 14], found
    assert not core_violations("import torch\ndef f():\n    import deepspeed\n", "ok.py", "disco_ds.optim")


def test_core_imports_point_down() -> None:
    modules = core_modules()
    assert {m.name for m in modules} >= {"scion.py", "norms.py", "newton_schulz.py", "layout.py", "exchange.py"}
    problems = []
    for path in modules:
        rel = path.relative_to(REPO).as_posix()
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        problems += core_violations(path.read_text(), rel, package, math_only=rel in MATH_MODULES)
    assert not problems, "forbidden imports in disco_ds/optim or disco_ds/distributed:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------- 4. the README's layout table


def layout_rows(readme: str) -> list[list[str]]:
    """The paths of each row of the README's ``## Layout`` table, resolved to repository paths.

    A row's first cell names paths in backticks; a bare name after a full path is a sibling of
    that path (```disco_ds/trainer/config.py`, `scaling.py``). Bold rows head a subpackage and
    name no files, so they cover nothing."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| path"):
            continue
        cell = line.split("|")[1]
        if cell.strip().startswith("**"):
            continue
        names = [n for n in cell.split("`")[1::2] if "/" in n or n.endswith(".py")]
        paths, folder = [], ""
        for name in names:
            if "/" in name.rstrip("/"):
                folder = name.rstrip("/").rsplit("/", 1)[0] if not name.endswith("/") else ""
                paths.append(name)
            else:
                paths.append(f"{folder}/{name}" if folder else name)
        rows.append(paths)
    return rows


def test_readme_layout_table_matches_the_tree() -> None:
    """Every path the table names exists, and every module of the package is in a row (by its
    file, or by a folder the row names)."""
    rows = layout_rows((REPO / "README.md").read_text())
    named = [p for row in rows for p in row]
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"the README's layout table names paths that do not exist: {missing}"
    folders = tuple(p for p in named if p.endswith("/"))
    modules = sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                     if "__pycache__" not in p.parts and p.name not in ("__init__.py", "__main__.py"))
    absent = [m for m in modules if m not in named and not m.startswith(folders)]
    assert not absent, f"modules missing from the README's layout table: {absent}"
