"""Settings from VAR_* environment variables, and the combinations refused at start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.serve.settings import ServeSettings, known_variables, unknown_variables

ROOT = Path(__file__).parents[2]


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


def test_an_unknown_var_variable_stops_the_start_naming_it_and_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAR_MAX_BATCH", "16")  # a typo of VAR_MAX_BATCH_SIZE
    monkeypatch.setenv("var_modeldir", "/models/x")  # pydantic-settings matches any case: so does the check
    with pytest.raises(ValidationError) as refused:
        ServeSettings()
    message = str(refused.value)
    assert "VAR_MAX_BATCH (did you mean VAR_MAX_BATCH_SIZE?)" in message
    assert "var_modeldir (did you mean VAR_MODEL_DIR?)" in message
    assert unknown_variables({"VAR_MAX_BATCH_SIZE": "8", "VARIABLE": "x", "HOME": "/root"}) == []


def test_the_server_process_refuses_to_start_with_an_unknown_var_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VAR_")} | {"VAR_QUEUE_CAPACTY": "9"}
    done = subprocess.run(
        [sys.executable, "-m", "app.serve"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode != 0
    assert "VAR_QUEUE_CAPACTY (did you mean VAR_QUEUE_CAPACITY?)" in done.stderr, done.stderr[-2000:]


def test_every_var_name_the_project_sets_is_a_setting() -> None:
    """Compose, the Dockerfile, the Ray configs, the Makefile, the code and the tests set only VAR_* names that
    are settings (else the start would stop): every VAR_ name in them but the typos these tests make on purpose
    and a placeholder of a help text."""
    typos = {"VAR_MAX_BATCH", "VAR_QUEUE_CAPACTY", "VAR_NAME"}  # VAR_NAME: `--set VAR_NAME=VALUE` (bench load)
    files = [ROOT / "Dockerfile", ROOT / "Makefile", ROOT / "docker-compose.yml"]
    files += [*(ROOT / "docker").rglob("*.y*ml"), *(ROOT / "app").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    found = {(m, f.relative_to(ROOT)) for f in files for m in re.findall(r"\bVAR_[A-Z][A-Z0-9_]*\b", f.read_text())}
    unknown = sorted((name, str(path)) for name, path in found if name not in known_variables() | typos)
    assert not unknown, f"VAR_* names that are no setting: {unknown}"


def test_api_keys_are_secret_long_and_never_printed() -> None:
    key, other = "k" * 15 + "-first-key", "second-key-0123456789"
    s = ServeSettings(api_keys=f" {key} ,{other},")  # type: ignore[arg-type]
    assert [k.get_secret_value() for k in s.api_keys] == [key, other]
    assert key not in repr(s) and key not in str(s.model_dump())
    with pytest.raises(ValidationError, match=r"positions \[1\] are shorter than 16") as short:
        ServeSettings(api_keys=f"{key},tooshort")  # type: ignore[arg-type]
    assert "tooshort" not in str(short.value) and key not in str(short.value)
    with pytest.raises(ValidationError, match="listed twice") as other_error:
        ServeSettings(api_keys=key, variants=["baseline", "baseline"])  # type: ignore[arg-type]
    assert key not in str(other_error.value)


def test_connection_limit_leaves_room_for_a_full_queue() -> None:
    s = ServeSettings(queue_capacity=64, max_batch_size=8)
    assert s.limit_concurrency == 0 and s.connection_limit == 64 + 8 + 64 <= s.backlog
    assert ServeSettings(limit_concurrency=500).connection_limit == 500
    with pytest.raises(ValidationError, match="limit_concurrency must exceed queue_capacity"):
        ServeSettings(limit_concurrency=72, queue_capacity=64, max_batch_size=8)


def test_a_forced_cpu_isa_must_be_a_known_level() -> None:
    assert ServeSettings(cpu_isa="avx2").cpu_isa == "avx2"
    with pytest.raises(ValidationError, match=r"cpu_isa must be one of generic, avx2, .*got 'avx3'"):
        ServeSettings(cpu_isa="avx3")
