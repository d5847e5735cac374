"""The compressed variants served beside the baseline, on the trained demo model and its window plan."""

from __future__ import annotations

import base64
import copy
import inspect
from concurrent.futures import ThreadPoolExecutor

from app.compress.compiled import compiled_step
from app.compress.guidance import guidance_off_last
from app.model.checkpoint import load_folder
from app.serve.http.encoding import encode_images
from app.serve.models import vqvae_shareable
from tests.conftest import DEMO, load_variant
from tests.serve.conftest import serve_settings, serving


def test_litevar_is_served_beside_the_baseline_with_its_stored_bytes() -> None:
    with serving(serve_settings(DEMO, variants=["baseline", "litevar-eager", "fastest-int8"])) as c:
        m = c.get("/models").json()
        by_name = {v["name"]: v for v in m["variants"]}
        assert [p["name"] for p in by_name["litevar-eager"]["passes"]] == [
            "device_default_precision",
            "windowed_attention",
            "cfg_attention_sharing",
            "quantize_linears",
            "int8_vqvae",
        ]
        # a pass bound with options is described by the function it binds: its name and its docstring's first line
        summary = (inspect.getdoc(guidance_off_last) or "").splitlines()[0]
        assert by_name["fastest-int8"]["passes"][-1] == {
            "name": "guidance_off_last",
            "options": {"scales": 1},
            "summary": summary,
        }
        base = by_name["baseline"]["weight_bytes"] + m["shared_weight_bytes"] * by_name["baseline"]["shares_vqvae"]
        # 42% on the demo model: fbgemm pads its 256-wide int8 weights to 512 input features (docs/benchmarks.md)
        assert by_name["litevar-eager"]["weight_bytes"] < 0.45 * base and not by_name["litevar-eager"]["shares_vqvae"]
        for variant in ("baseline", "litevar-eager", "fastest-int8"):
            r = c.post("/generate", json={"class_name": "Sneaker", "seed": 5, "variant": variant})
            assert r.status_code == 200 and r.json()["variant"] == variant


def test_a_litevar_image_is_bitwise_the_same_batched_or_alone() -> None:
    """int8 activations are quantized per token and the windows are fixed: nothing depends on the batch."""
    bodies = [{"class_label": c, "seed": 40 + c, "variant": "litevar-eager"} for c in (2, 7, 9)]
    settings = serve_settings(DEMO, variants=["litevar-eager"], max_batch_size=3, max_wait_ms=60_000)
    with serving(settings) as c, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: c.post("/generate", json=b).json(), bodies))
    alone_pipe = load_variant("litevar-eager")
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["batch_sizes"] == [3]
        alone = alone_pipe.generate([body["class_label"]], seeds=[body["seed"]])
        assert base64.b64decode(answer["images"][0]["data"]) == encode_images(alone.images, "png")[0]


def test_a_compiled_vqvae_is_never_swapped_for_the_shared_one() -> None:
    """Variants share the baseline's VQVAE when theirs is unchanged; a compiled decoder has the same weights
    but must keep its compiled forward."""
    base = load_folder(DEMO)
    assert vqvae_shareable(copy.deepcopy(base), base)
    assert not vqvae_shareable(compiled_step(copy.deepcopy(base)), base)
