"""The house has floors: a module imports only from the floors below it and from its own package, never up and never
sideways into a sibling package, so a change low down cannot be broken by code above it, and each package can be read
(and run: `conveyor drift` loads no web framework) without the ones beside it.

    foundation (conveyor/, except the CLI)  <-  pipelines  <-  serving, monitoring, labelling  <-  flows  <-  stack
    <-  the CLI (conveyor/cli/)

Lazy imports (inside a function) count: they are dependencies all the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.scaffold import REPO
from tests.test_dag import project_imports

FLOORS: dict[str, int] = {
    "conveyor": 0,
    "pipelines": 1,
    "serving": 2,
    "monitoring": 2,
    "labelling": 2,
    "flows": 3,
    "stack": 4,
    "conveyor.cli": 5,
}


def package_of(module: str) -> str:
    return "conveyor.cli" if module == "conveyor.cli" or module.startswith("conveyor.cli.") else module.split(".")[0]


def _module_name(file: Path) -> str:
    parts = file.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[Path]:
    return sorted(
        f
        for top in ("conveyor", "pipelines", "serving", "monitoring", "labelling", "flows", "stack")
        for f in (REPO / top).rglob("*.py")
    )


def test_the_floors_list_every_package() -> None:
    assert {package_of(_module_name(f)) for f in _modules()} == set(FLOORS)


@pytest.mark.parametrize("file", _modules(), ids=lambda f: f.relative_to(REPO).as_posix())
def test_a_module_imports_only_from_below_and_its_own_package(file: Path) -> None:
    own = package_of(_module_name(file))
    wrong = sorted(
        f"{name} (floor {FLOORS[package_of(name)]}, this is {own} on floor {FLOORS[own]})"
        for name in project_imports(file)
        if package_of(name) != own and FLOORS[package_of(name)] >= FLOORS[own]
    )
    assert not wrong, f"{file.relative_to(REPO)} imports up or sideways: {wrong}"


def test_no_import_circle_between_modules() -> None:
    graph = {_module_name(f): {n for n in project_imports(f)} for f in _modules()}
    graph = {m: {n for n in targets if n in graph and n != m} for m, targets in graph.items()}

    def parent_of(package: str, module: str) -> bool:  # `from conveyor import x` inside conveyor/: no circle
        return module.startswith(f"{package}.")

    # Only top-level imports can make an import-time circle: count those.
    state: dict[str, int] = {}
    circle: list[str] = []

    def visit(module: str, trail: list[str]) -> bool:
        state[module] = 1
        for target in sorted(
            t for t in _top_level_imports(module) & set(graph) if t != module and not parent_of(t, module)
        ):
            if state.get(target) == 1:
                circle.extend([*trail, module, target])
                return True
            if state.get(target) is None and visit(target, [*trail, module]):
                return True
        state[module] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not circle, f"import circle: {' -> '.join(circle)}"


def _top_level_imports(module: str) -> set[str]:
    import ast

    base = REPO.joinpath(*module.split("."))
    file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    found: set[str] = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_drift_check_and_the_cli_load_no_server() -> None:
    """`conveyor drift` and labelling load neither the model server nor its web stack (uvicorn, PyTriton, Triton's
    client). FastAPI itself is not in the list: MLflow's client imports it (3.x, for its tracing types)."""
    heavy = ("uvicorn", "pytriton", "tritonclient", "serving")
    probe = (
        "import sys\n"
        "import conveyor.cli, monitoring.check, monitoring.current, labelling.run\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"loaded: {loaded.stdout.strip()}"


def test_a_command_group_imports_no_sibling() -> None:
    """Each CLI group defines its own Typer app; only `conveyor/cli/__init__.py` mounts them, and what they share is
    in `conveyor.cli.common` (and `conveyor status`'s screen in `project_status`, which only its group uses)."""
    shared = {"conveyor.cli.common", "conveyor.cli.project_status"}
    groups = sorted(f for f in (REPO / "conveyor" / "cli").glob("*.py") if f.stem not in ("__init__", "__main__"))
    wrong = {
        f.name: sorted(n for n in project_imports(f) if n.startswith("conveyor.cli") and n not in shared)
        for f in groups
    }
    assert not {name: found for name, found in wrong.items() if found}
    users = [f.name for f in groups if "conveyor.cli.project_status" in project_imports(f)]
    assert users == ["orchestration.py"]


def test_the_modules_an_edge_bundle_carries_import_no_conveyor(tmp_path: Path) -> None:
    """The edge runner loads the server's feature and log code from its bundle (`serving.bundle.EDGE_MODULES`):
    copied alone, each imports and runs with no Conveyor module loaded."""
    import shutil

    from serving.bundle import EDGE_MODULES

    for module in EDGE_MODULES:
        shutil.copyfile(module, tmp_path / module.name)
    probe = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import features, log_parts\n"
        "row = features.image_features(features.sample_image(np.full((48, 64, 3), 90, np.uint8), 320))\n"
        "assert row['brightness'] == 90.0, row\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'conveyor', 'pipelines', 'serving'})))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "", f"loaded: {loaded.stdout.strip()}"
