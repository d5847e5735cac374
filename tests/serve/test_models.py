"""Loading variants for the service: one window plan for the windowed ones (the checkpoint's, else one
calibrated at load, or with that switched off a failed variant naming the command, the others serving), and a
VQVAE shared only where the pipeline's decoder hook is plain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import app.compress.calibrate
from app.bench.prometheus_text import by_label
from app.compress.attention import PlannedAttention
from app.compress.plans import MissingWindowPlan, PlanOrigin
from app.serve.app import create_app
from app.serve.models import load_model
from tests.conftest import DEMO
from tests.serve.conftest import serve_settings, serving, wait_until_settled
from tests.serve.test_metrics import scrape

CPU = torch.device("cpu")


def test_a_windowed_variant_without_a_saved_plan_fails_naming_the_command_while_the_others_serve(
    demo_folder: Path,
) -> None:
    """Calibrating missing plans switched off: the windowed variant fails (MissingWindowPlan naming the command
    that saves a plan), visibly, and the process stays alive and ready: the baseline serves."""
    command = f"python -m app.compress calibrate --model {demo_folder}"
    settings = serve_settings(demo_folder, variants=["baseline", "windows"], calibrate_missing_plans=False)
    with TestClient(create_app(settings)) as c:
        wait_until_settled(c)
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        windows = ready.json()["variants"]["windows"]
        assert ready.status_code == 200 and windows["state"] == "failed"
        assert windows["error"].startswith(MissingWindowPlan.__name__) and command in windows["error"]
        by_name = {v["name"]: v for v in c.get("/models").json()["variants"]}
        assert by_name["windows"]["state"] == "failed" and by_name["windows"]["error"] == windows["error"]
        assert by_name["windows"]["weight_bytes"] is None and by_name["baseline"]["state"] == "ready"
        refused = c.post("/generate", json={"class_label": 1, "variant": "windows"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
        assert refused.json()["detail"].startswith("variant windows failed to start: MissingWindowPlan")
        assert c.post("/generate", json={"class_label": 1}).status_code == 200
        assert by_label(scrape(c), "var_variant_ready", "variant") == {"baseline": 1.0, "windows": 0.0}


def test_a_default_variant_that_cannot_start_fails_the_load_naming_the_command(demo_folder: Path) -> None:
    """Requests that name no variant could never be served: the process is not alive (it gets restarted)."""
    settings = serve_settings(demo_folder, variants=["windows", "baseline"], calibrate_missing_plans=False)
    with TestClient(create_app(settings)) as c:
        wait_until_settled(c)
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["reason"] == "load_failed"
        assert health.json()["error"].startswith(MissingWindowPlan.__name__)
        assert f"python -m app.compress calibrate --model {demo_folder}" in health.json()["error"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert ready.json()["variants"]["baseline"] == {
            "state": "failed",
            "doing": None,
            "progress": None,
            "error": "not started: the load failed",
        }


def test_calibrating_missing_plans_at_load_is_reported(demo_without_plans: Path) -> None:
    settings = serve_settings(demo_without_plans, variants=["baseline", "windows"], calibrate_missing_plans=True)
    with serving(settings) as c:
        by_name = {v["name"]: v for v in c.get("/models").json()["variants"]}
        assert by_name["windows"]["window_plan"] == "calibrated at load"
        assert by_name["baseline"]["window_plan"] is None
        info = {dict(labels)["variant"]: dict(labels) for name, labels in scrape(c) if name == "var_variant_info"}
        assert info["windows"]["passes"] == "device_default_precision,windowed_attention"
        assert info["windows"]["window_plan"] == "calibrated at load" and info["baseline"]["window_plan"] == "none"
        assert c.post("/generate", json={"class_label": 1, "variant": "windows"}).status_code == 200


def test_both_missing_plans_come_from_one_calibration_run(demo_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    record = app.compress.calibrate.record

    def counted(*args: object, **kwargs: object) -> None:
        runs.append(1)
        record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(app.compress.calibrate, "record", counted)
    model = load_model(demo_folder, ["baseline", "litevar-float"], CPU, calibrate_missing_plans=True)
    litevar = model.variants["litevar-float"]
    assert (litevar.window_plan, litevar.sharing_plan) == (PlanOrigin.CALIBRATED, PlanOrigin.CALIBRATED)
    assert len(runs) == 1


def test_windowed_variants_share_the_plan_saved_beside_the_checkpoint() -> None:
    model = load_model(DEMO, ["baseline", "windows", "litevar-float"], CPU)
    origins = {name: v.window_plan for name, v in model.variants.items()}
    assert origins == {"baseline": None, "windows": PlanOrigin.FILE, "litevar-float": PlanOrigin.FILE}
    for name in ("windows", "litevar-float"):
        kernels = [blk.attn.kernel for blk in model.variants[name].pipeline.var.block_list]
        assert all(isinstance(k, PlannedAttention) and k.routes for k in kernels), name
    assert model.variants["windows"].spec.purpose and model.variants["windows"].spec.describe()[1]["options"] == {
        "min_skipped": None,
        "min_queries": 128,
    }


def test_only_a_plain_decoder_hook_shares_the_vqvae(demo_folder: Path) -> None:
    """The compiled variant's VQVAE has the same weights but its pipeline decodes through a compiled hook: it
    keeps its own VQVAE. A shared VQVAE brings its decoder along, so no copy stays alive behind the hook."""
    model = load_model(demo_folder, ["baseline", "bf16", "compiled"], CPU)
    baseline, bf16, compiled = (model.variants[n] for n in ("baseline", "bf16", "compiled"))
    assert baseline.shares_vqvae and bf16.shares_vqvae and not compiled.shares_vqvae
    assert bf16.pipeline.vqvae is baseline.pipeline.vqvae
    assert bf16.pipeline.decoder_fn is baseline.pipeline.vqvae.decoder
    assert compiled.pipeline.vqvae is not baseline.pipeline.vqvae
    assert compiled.pipeline.decoder_fn is not compiled.pipeline.vqvae.decoder
    assert compiled.weight_bytes > bf16.weight_bytes


def test_the_server_computes_on_torchs_default_threads_unless_told(demo_folder: Path) -> None:
    default = torch.get_num_threads()
    try:
        with serving(serve_settings(demo_folder, torch_threads=0)) as client:
            assert client.get("/models").json()["torch_threads"] == default  # every CPU torch may use
        with serving(serve_settings(demo_folder, torch_threads=1)) as client:
            assert client.get("/models").json()["torch_threads"] == 1
    finally:
        torch.set_num_threads(default)
