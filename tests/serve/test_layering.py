"""Dependency rules of the service: the engine knows no web framework; only the composition root reads settings."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).parents[2] / "app" / "serve"
WEB = {"fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_batching_and_model_loading_import_no_web_framework() -> None:
    for name in ("engine.py", "batching.py", "models.py", "metrics.py", "encoding.py"):
        found = {n.split(".")[0] for n in imports(SERVE / name)} & WEB
        assert not found, f"{name} imports {found}"


def test_only_the_composition_root_and_service_read_settings() -> None:
    readers = {p.name for p in SERVE.glob("*.py") if "app.serve.settings" in imports(p)}
    assert readers == {"app.py", "service.py", "__main__.py"}
