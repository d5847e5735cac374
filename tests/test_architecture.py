"""Dependency rules: model code is plain PyTorch (no web, no other app package); the service's engine knows no
web framework and only its composition root reads settings."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).parents[1] / "app"
MODEL_ALLOWED = {"torch", "numpy", "safetensors", "app"}
WEB = {"fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn", "prometheus_client", "httpx"}
SERVE = APP / "serve"
WEB_FRAMEWORK = {"fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_model_imports_only_torch_numpy_safetensors_and_itself() -> None:
    import sys

    for path in (APP / "model").glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in MODEL_ALLOWED | set(sys.stdlib_module_names), f"{path.name} imports {name}"
            if top == "app":
                assert name.startswith("app.model"), f"{path.name} imports {name}"


def test_no_web_framework_below_the_api() -> None:
    for pkg in ("model", "compress"):
        for path in (APP / pkg).glob("*.py"):
            assert not {n.split(".")[0] for n in _imports(path)} & WEB, path


def test_engine_batching_and_model_loading_import_no_web_framework() -> None:
    for name in ("engine.py", "batching.py", "models.py", "metrics.py", "encoding.py"):
        found = {n.split(".")[0] for n in _imports(SERVE / name)} & WEB_FRAMEWORK
        assert not found, f"{name} imports {found}"


def test_only_the_composition_root_and_service_read_settings() -> None:
    readers = {p.name for p in SERVE.glob("*.py") if "app.serve.settings" in _imports(p)}
    assert readers == {"app.py", "service.py", "__main__.py"}


def _app_modules() -> dict[str, Path]:
    """Every module of the app by dotted name (a package by its `__init__`)."""
    modules = {}
    for path in APP.rglob("*.py"):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _app_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The app modules `path` imports anywhere in it (`from app.x import y` counts `app.x.y` when a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {node.module}
    return found


def test_no_import_cycle_between_app_modules() -> None:
    modules = _app_modules()
    graph = {name: _app_imports(path, modules) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join([*trail[trail.index(name) :], name])}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_product_imports_no_tool() -> None:
    """Tools (app.tools, app.bench, app.train) sit beside the product and are never imported by it."""
    tools = ("app.tools", "app.bench", "app.train")
    for pkg in ("model", "compress", "quality", "serve"):
        for path in (APP / pkg).rglob("*.py"):
            found = {n for n in _imports(path) if n.startswith(tools)}
            assert not found, f"{path.relative_to(APP)} imports {found}"


def test_compression_imports_only_the_model_and_itself() -> None:
    for path in (APP / "compress").glob("*.py"):
        found = {n for n in _imports(path) if n.startswith("app.") and not n.startswith(("app.model", "app.compress"))}
        assert not found, f"{path.name} imports {found}"


def test_the_product_never_imports_ray_or_its_deployment() -> None:
    """app.ray_serve is a deployment entry beside the product, like app/serve/__main__.py: Ray is an optional
    extra, so the product runs and tests without it."""
    for pkg in ("model", "compress", "quality", "serve"):
        for path in (APP / pkg).rglob("*.py"):
            found = {n for n in _imports(path) if n.split(".")[0] == "ray" or n.startswith("app.ray_serve")}
            assert not found, f"{path.relative_to(APP)} imports {found}"
