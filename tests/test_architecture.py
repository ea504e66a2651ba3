"""The rooms of the package and the direction of their imports (docs/CONTRIBUTING.md).

Every `import delg_tf.<room>` / `from delg_tf.<room> import ...` found anywhere in a
module (also inside functions) must point to a room listed below the importing one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "delg_tf"
# Lowest first. A room may import the rooms before it, never the ones after it.
LAYERS = (
    ("configs", "atomic", "locking", "interrupts", "progress", "protos", "cli"),
    ("ops",),
    ("losses",),
    ("layers",),
    ("backbones",),
    ("models",),
    ("data",),
    ("training",),
    ("extraction",),
    ("matching",),
    ("retrieval",),
    ("serving",),
    ("official",),
    ("evaluation",),
    ("visualization",),
)
# Entry modules (flags, stages) sit on top of every room.
ENTRY_MODULES = (
    "__init__",
    "train",
    "export",
    "extract",
    "extract_beam",
    "evaluate",
    "convert_official",
    "demo",
    "index",
)
# Entry modules that live inside a room's folder.
ROOM_ENTRY_MODULES = {("data", "build_tfrecords")}
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
TOP = len(LAYERS)


def _room_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "delg_tf" and len(parts) > 1:
                yield node.lineno, parts[1], name


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_and_entry_module_is_placed():
    rooms = {_room_of(p) for p in _modules()}
    unplaced = rooms - set(LEVEL) - set(ENTRY_MODULES)
    assert not unplaced, f"add {sorted(unplaced)} to LAYERS or ENTRY_MODULES"


def test_imports_point_down():
    violations = []
    for path in _modules():
        source = _room_of(path)
        relative = path.relative_to(PACKAGE).with_suffix("").parts
        if source in ENTRY_MODULES or (relative[0], relative[-1]) in ROOM_ENTRY_MODULES:
            continue
        for line, target, name in _imports(path):
            if target == source or target in ENTRY_MODULES and target == "__init__":
                continue
            if LEVEL.get(target, TOP) > LEVEL[source]:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) "
                    f"imports {name} ({target})"
                )
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    "room, forbidden",
    [
        ("extraction", ("serving", "official")),
        ("matching", ("retrieval",)),
        ("evaluation", ("training.trainer",)),
    ],
)
def test_issue_13_directions(room, forbidden):
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for line, _, name in _imports(path):
            assert not any(
                name == f"delg_tf.{f}" or name.startswith(f"delg_tf.{f}.") for f in forbidden
            ), f"{path}:{line} imports {name}"


def test_export_does_not_import_evaluation():
    for line, target, name in _imports(PACKAGE / "export.py"):
        assert target != "evaluation", f"export.py:{line} imports {name}"


def test_no_ctypes_and_no_pixel_digests():
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        assert "import ctypes" not in text, path
        assert "blake2b" not in text and "_image_digest" not in text, path
