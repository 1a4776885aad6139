"""The package's layers point down only, and mllm's own imports sit at module top (docs/ARCHITECTURE.md).

Every `import` of every module under mllm/ is parsed (top-level and inside functions alike): a module may import its
own group and the rows below its own, never a row above it or a peer group of the same row (train and eval do not
import each other, nor web and serve). Imports inside functions are allowed only in the command line (its modules are all imported to
build the parser, so the library is imported in each command's `run`) and in `mllm/__init__.py` (lazy exports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MLLM = Path(__file__).resolve().parents[1] / "mllm"

LAYERS = [
    # rows from the bottom; a row's groups are peers that do not import each other (train and eval, web and serve)
    [("io", "files", "boxes")],  # resumable JSONL, atomic writes, image decoding, the box convention
    [("model",)],  # the network and its input type (MLLMInputs)
    [("processing",)],  # images + prompts -> MLLMInputs
    [("vlm",)],  # one interface over the model families
    [("api",)],  # the front door: mllm.load
    [("data",)],  # datasets, collators, format readers and writers
    [("train",), ("eval",)],  # trainers and evaluations
    [("web",), ("serve",), ("demo", "toy", "bench")],  # applications
    [("cli", "__main__")],  # one module per subcommand
]

PLUGIN_HOOK = "mllm/model/registry.py"
"""The one place a lower layer reaches an application package: the registry of stems and projectors imports its
PLUGIN_PACKAGES (the toy world's from-scratch options) with importlib, inside the lookup of a name it does not know,
so that a toy checkpoint loads through MLLMModel.from_pretrained. Besides mllm/__init__ (lazy exports) and the command
line (its subcommands), no other module under mllm/ uses import_module."""
LAZY_IMPORT_PACKAGES = ("cli", "demo")
"""Where an mllm import may sit inside a function: the command line (see the module docstring), and for now the
demo app, whose stages import the library in the stage that needs it."""


def module_name(path: Path) -> str:
    parts = path.relative_to(MLLM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level part of mllm a module belongs to ("model", "cli", "api", "toy", ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def place_of(module: str) -> tuple[int, int]:
    """(row, group within the row) of a module's package."""
    package = package_of(module)
    for row, groups in enumerate(LAYERS):
        for group, packages in enumerate(groups):
            if package in packages:
                return row, group
    raise AssertionError(f"{module}: package {package!r} is in no layer of this test; add it to LAYERS")


def allowed(source: str, target: str) -> bool:
    """A module may import a lower row, or its own group."""
    return place_of(target)[0] < place_of(source)[0] or place_of(target) == place_of(source)


def mllm_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported mllm module, line, at module top) of every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mllm"):
            names = [node.module]
            if node.module in ("mllm", "mllm.cli"):  # `from mllm.cli import chair`: submodules
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(name, node.lineno, id(node) in top_level) for name in names]
        elif isinstance(node, ast.Import):
            found += [
                (a.name, node.lineno, id(node) in top_level) for a in node.names if a.name.startswith("mllm")
            ]
    return found


def test_layers_point_down_and_imports_sit_at_the_top():
    upward, lazy = [], []
    modules = sorted(MLLM.rglob("*.py"))
    assert len(modules) > 50
    for path in modules:
        source = module_name(path)
        if source == "mllm":
            continue  # the lazy public names of the package
        for target, line, at_top in mllm_imports(path):
            where = f"{path.relative_to(MLLM.parent)}:{line} imports {target}"
            if not at_top and package_of(source) not in LAZY_IMPORT_PACKAGES:
                lazy.append(where)
            if not allowed(source, target):
                upward.append(f"{where} ({package_of(source)} -> {package_of(target)})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)
    assert not lazy, "mllm imports inside functions outside the command line:\n" + "\n".join(lazy)


def test_the_checker_sees_an_upward_import(tmp_path):
    fake = tmp_path / "probe.py"
    fake.write_text("from mllm.cli.common import load_from_args\n\ndef f():\n    from mllm.api import load\n")
    found = mllm_imports(fake)
    assert found == [("mllm.cli.common", 1, True), ("mllm.api", 4, False)]
    assert allowed("mllm.cli.common", "mllm.demo.evaluate") and allowed(
        "mllm.demo.evaluate", "mllm.eval.answer"
    )
    assert not allowed("mllm.eval.answer", "mllm.train.sft") and not allowed(
        "mllm.data.grounding", "mllm.eval.vqa"
    )
    assert allowed("mllm.demo.build", "mllm.toy.pretrain")  # a toy module is an application beside the demo
    assert not allowed("mllm.train.sft", "mllm.toy.pretrain") and not allowed(
        "mllm.web.app", "mllm.serve.app"
    )


def test_the_command_line_builds_without_torch():
    """Why the command line imports the library inside its commands: `mllm --help` and argument errors stay instant."""
    probe = "import sys, mllm.cli; mllm.cli.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_registry_is_the_one_plugin_hook():
    from mllm.model import registry

    assert registry.PLUGIN_PACKAGES == ("mllm.toy",)
    assert all(
        place_of(package)[0] > place_of("mllm.model.registry")[0] for package in registry.PLUGIN_PACKAGES
    )
    dynamic = sorted(
        str(path.relative_to(MLLM.parent))
        for path in MLLM.rglob("*.py")
        if "import_module(" in path.read_text(encoding="utf-8")
        and package_of(module_name(path)) not in ("", "cli")  # lazy exports of mllm/__init__, the subcommands
    )
    assert dynamic == [PLUGIN_HOOK], dynamic
