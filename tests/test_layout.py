"""The code's layout follows the data: stages import only the stages before them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: `pipeline` sub-packages and modules, in the order of the flow (README, Development).
STAGES = ["errors", "config", "images", "cells", "measure", "profiling", "calls",
          "views", "run", "cli"]  # fmt: skip
#: Packages above the store (it may import none of them).
UPPER_PACKAGES = {"pipeline", "models", "app"}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at its top or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_pipeline_stages_import_only_earlier_stages():
    upward = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        me = _stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me not in STAGES:
            continue
        for module in _imports(path):
            other = _stage(module)
            if other in STAGES and STAGES.index(other) > STAGES.index(me):
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward
    assert {p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir()} - {
        "__pycache__"
    } <= set(STAGES)


def test_segmenter_and_segmentation_import_no_circle():
    """The learned segmenter uses the shared plane helpers, not the segmentation
    module that loads it."""
    segmenter = _imports(ROOT / "models" / "segmenter.py")
    assert "pipeline.images.planes" in segmenter
    assert not [m for m in segmenter if m.startswith("pipeline.cells")]


def test_store_is_split_by_concern_and_re_exported():
    from db import readers, runs, schema, store, writers

    facade = ast.parse((ROOT / "db" / "store.py").read_text())
    assert not [n for n in facade.body if isinstance(n, ast.FunctionDef)]
    for name in store.__all__:  # one public API, each name from its own module
        owner = getattr(store, name)
        assert any(
            getattr(m, name, None) is owner for m in (readers, runs, schema, writers)
        )
    assert store.write_field_cells.__module__ == "db.writers"
    assert store.iter_plate_cells.__module__ == "db.readers"
    assert store.open_run.__module__ == "db.runs"


def test_store_imports_no_pipeline_stage_and_no_private_names():
    """The store sits below the pipeline; its modules share only public names."""
    for path in sorted((ROOT / "db").glob("*.py")):
        tree = ast.parse(path.read_text())
        upward = [m for m in _imports(path) if m.split(".")[0] in UPPER_PACKAGES]
        assert not upward, f"{path.name} imports {upward}"
        private = [
            f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("db")
            for alias in node.names
            if alias.name.startswith("_")
        ]
        assert not private, f"{path.name} imports private {private}"
