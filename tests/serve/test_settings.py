"""Settings from VAR_* environment variables, and the combinations refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.serve.settings import ServeSettings


def test_settings_come_from_var_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_MODEL_DIR", "/models/x")
    monkeypatch.setenv("VAR_VARIANTS", "baseline, bf16")
    monkeypatch.setenv("VAR_DEFAULT_VARIANT", "bf16")
    monkeypatch.setenv("VAR_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("VAR_MAX_WAIT_MS", "2.5")
    s = ServeSettings()
    assert (s.model_dir, s.variants, s.default_variant) == (Path("/models/x"), ["baseline", "bf16"], "bf16")
    assert (s.max_batch_size, s.max_wait_ms) == (16, 2.5)


def test_defaults_serve_the_demo_model_on_loopback() -> None:
    s = ServeSettings()
    assert (s.model_dir, s.host, s.port, s.default_variant) == (Path("model_store/demo"), "127.0.0.1", 8000, "baseline")
    assert s.variants == ["baseline", "litevar"]  # the compressed variant beside the baseline


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variants": ["nope"]}, "variants must be"),
        ({"variants": ["baseline", "baseline"]}, "listed twice"),
        ({"variants": ["baseline"], "default_variant": "bf16"}, "not one of variants"),
        ({"max_images_per_request": 100, "queue_capacity": 10}, "queue_capacity"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"default_timeout_s": 10, "max_timeout_s": 5}, "max_timeout_s"),
    ],
)
def test_inconsistent_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeSettings(**values)  # type: ignore[arg-type]
