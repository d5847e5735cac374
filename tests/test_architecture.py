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
