"""Dependency rules, checked by folder: model code is plain PyTorch (no web, no other app package); the
service's engine knows no web framework; the HTTP layer never reaches up into the composition root; the
metrics leaf imports neither layer; only the composition root reads settings."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path

APP = Path(__file__).parents[1] / "app"
SERVE = APP / "serve"
MODEL_ALLOWED = {"torch", "numpy", "safetensors", "app"}
WEB = {"fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn", "prometheus_client", "httpx"}
WEB_FRAMEWORK = {"fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn"}
ROOT = (
    "app.serve.app",
    "app.serve.service",
    "app.serve.settings",
    "app.serve.models",
    "app.serve.startup",
    "app.serve.__main__",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.py"))
    assert files, f"no module under {folder}"  # a rule over an empty (moved) folder would check nothing
    return files


def _found(folder: Path, forbidden: Callable[[str], bool]) -> dict[str, set[str]]:
    """The forbidden imports of every module under `folder`: `forbidden(name)` says whether `name` is one."""
    found = {}
    for path in _files(folder):
        bad = {n for n in _imports(path) if forbidden(n)}
        if bad:
            found[str(path.relative_to(APP))] = bad
    return found


def _under(*prefixes: str) -> Callable[[str], bool]:
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


def test_model_imports_only_torch_numpy_safetensors_and_itself() -> None:
    allowed = MODEL_ALLOWED | set(sys.stdlib_module_names)
    assert _found(APP / "model", lambda n: n.split(".")[0] not in allowed) == {}
    assert _found(APP / "model", lambda n: n.split(".")[0] == "app" and not _under("app.model")(n)) == {}


def test_model_and_compression_import_nothing_of_the_web() -> None:
    for pkg in ("model", "compress"):
        assert _found(APP / pkg, lambda n: n.split(".")[0] in WEB) == {}


def test_the_engine_imports_no_web_framework_nor_the_layers_above_it() -> None:
    """The engine knows no HTTP: no web framework, nothing of app/serve/http/, nothing of the composition root
    (it gets plain values); the metrics leaf is the one piece of app/serve/ outside it that it may use."""
    engine = SERVE / "engine"
    assert _found(engine, lambda n: n.split(".")[0] in WEB_FRAMEWORK) == {}
    assert _found(engine, _under("app.serve.http", *ROOT)) == {}


def test_the_http_layer_never_imports_the_composition_root() -> None:
    """Arrows run down: app.py and service.py import the HTTP layer, which reaches the service through a
    protocol (routes.Backend)."""
    assert _found(SERVE / "http", _under(*ROOT)) == {}


def test_metrics_import_neither_the_engine_nor_the_http_layer() -> None:
    found = {n for n in _imports(SERVE / "metrics.py") if _under("app.serve")(n)}
    assert found == set()


def test_only_the_composition_root_reads_settings() -> None:
    readers = {str(p.relative_to(SERVE)) for p in _files(SERVE) if "app.serve.settings" in _imports(p)}
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
    for pkg in ("model", "compress", "quality", "serve"):
        assert _found(APP / pkg, _under("app.tools", "app.bench", "app.train")) == {}


def test_compression_imports_only_the_model_and_itself() -> None:
    assert _found(APP / "compress", lambda n: _under("app")(n) and not _under("app.model", "app.compress")(n)) == {}


def test_the_product_never_imports_ray_or_its_deployment() -> None:
    """app.ray_serve is a deployment entry beside the product, like app/serve/__main__.py: Ray is an optional
    extra, so the product runs and tests without it."""
    for pkg in ("model", "compress", "quality", "serve"):
        assert _found(APP / pkg, _under("ray", "app.ray_serve")) == {}
