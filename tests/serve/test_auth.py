"""Optional API keys (VAR_API_KEYS): who gets in, what a refusal says, and that no key is ever written out."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.serve.app import create_app
from app.serve.http.auth import ApiKeys
from tests.serve.conftest import live_server_process, serve_settings, wait_ready

KEY, OTHER_KEY = "first-key-0123456789abcdef", "second-key-9876543210fedcba"
REFUSED = {"detail": "a valid API key is required"}
BODY = {"class_label": 1, "seed": 3}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(demo_folder: Path) -> Iterator[TestClient]:
    with TestClient(create_app(serve_settings(demo_folder, api_keys=f"{KEY},{OTHER_KEY}"))) as c:
        wait_ready(c)  # /readyz stays open: VAR_PROTECT_OPS is off
        yield c


WRONG: dict[str, dict[str, str | bytes]] = {
    "no header": {},
    "a wrong key": bearer("not-the-key-0123456789abcdef"),
    "the key less its last character": bearer(KEY[:-1]),
    "the key with one more": bearer(KEY + "x"),
    "another scheme": {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()},
    "no scheme": {"Authorization": KEY},
    "an empty bearer": {"Authorization": "Bearer "},
    "a wrong X-API-Key": {"X-API-Key": "not-the-key-0123456789abcdef"},
    "the key in another header": {"X-Api-Token": KEY},
    "non-ASCII bytes": {"X-API-Key": "ключ-0123456789abcdef".encode()},
}


@pytest.mark.parametrize("headers", WRONG.values(), ids=WRONG.keys())
def test_without_a_valid_key_the_api_is_401_saying_the_same_whatever_was_wrong(
    client: TestClient, headers: dict[str, str | bytes]
) -> None:
    for r in (client.post("/generate", json=BODY, headers=headers), client.get("/models", headers=headers)):
        assert r.status_code == 401, r.text
        assert r.json() == REFUSED
        assert r.headers["www-authenticate"] == 'Bearer realm="var-serve"'


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_any_configured_key_works_as_bearer_or_x_api_key(client: TestClient, key: str) -> None:
    for headers in (bearer(key), {"X-API-Key": key}, {"Authorization": f"bearer {key}"}):
        assert client.get("/models", headers=headers).status_code == 200
    r = client.post("/generate", json=BODY, headers={"X-API-Key": key, "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_probes_metrics_playground_and_docs_stay_open(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_refusals_are_counted_and_the_keys_appear_nowhere(client: TestClient) -> None:
    client.get("/models")
    metrics = client.get("/metrics").text
    assert 'var_rejections_total{reason="unauthorized"}' in metrics
    assert next(ln for ln in metrics.splitlines() if 'reason="unauthorized"' in ln).split()[-1] != "0.0"
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}, "Swagger's Authorize knows both ways"
    assert "401" in doc["paths"]["/generate"]["post"]["responses"]
    texts = [metrics, client.get("/models", headers=bearer(KEY)).text, str(doc), client.get("/").text]
    assert not any(k in t for t in texts for k in (KEY, OTHER_KEY))


def test_protect_ops_puts_the_keys_on_health_readiness_and_metrics(demo_folder: Path) -> None:
    settings = serve_settings(demo_folder, api_keys=KEY, protect_ops=True)
    with TestClient(create_app(settings)) as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=bearer(KEY)).status_code in (200, 503), path  # 503: still loading
        assert c.get("/openapi.json").status_code == 200


def test_every_configured_key_is_compared_whichever_matches() -> None:
    keys = ApiKeys([KEY, OTHER_KEY])
    assert keys.accepts(KEY) and keys.accepts(OTHER_KEY)
    assert not keys.accepts(None) and not keys.accepts("") and not keys.accepts(KEY.upper())
    assert not ApiKeys([]) and ApiKeys([KEY])


def test_the_server_log_never_holds_a_key(demo_folder: Path, tmp_path: Path) -> None:
    """uvicorn's access log and the app's own log, at debug level, after requests with right and wrong keys."""
    log = tmp_path / "server.log"
    wrong = "wrong-key-but-long-enough-0123"
    env = {"VAR_API_KEYS": f"{KEY},{OTHER_KEY}", "VAR_LOG_LEVEL": "debug", "VAR_VARIANTS": "baseline"}
    env["VAR_ACCESS_LOG"] = "true"  # off by default
    with live_server_process(demo_folder, log, **env) as server:
        for headers in (bearer(KEY), {"X-API-Key": OTHER_KEY}, bearer(wrong), {"X-API-Key": wrong}):
            httpx.get(f"{server.url}/models", headers=headers, timeout=30)
            httpx.post(f"{server.url}/generate", json={"class_label": "x"}, headers=headers, timeout=30)
        assert httpx.get(f"{server.url}/models", headers=bearer(KEY), timeout=30).status_code == 200
    text = log.read_text()
    assert '"GET /models HTTP/1.1" 401' in text, "the access log was written"
    assert not any(k in text for k in (KEY, OTHER_KEY, wrong))


def test_trace_logging_which_writes_headers_is_refused_with_keys() -> None:
    with pytest.raises(ValueError, match="trace"):
        serve_settings(Path("x"), api_keys=KEY, log_level="trace")
