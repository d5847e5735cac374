"""Service settings, read from the environment (prefix `VAR_`); only `app.serve.app` reads them.

A `VAR_*` variable that names no setting (a typo such as `VAR_MAX_BATCH`) stops the start, naming it:
pydantic-settings itself reads only the variables of known fields and would ignore it silently.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.compress import VARIANTS
from app.compress.hardware import LEVELS

ENV_PREFIX = "VAR_"
MIN_API_KEY_CHARS = 16


class ServeSettings(BaseSettings):
    # hide_input_in_errors: a refused setting's message must not print the other settings' values (API keys)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", hide_input_in_errors=True)

    model_dir: Path = Field(default=Path("model_store/demo"), description="checkpoint folder to serve")
    variants: Annotated[list[str], NoDecode] = Field(
        default=["baseline", "litevar"], description="variants to load, e.g. baseline,litevar,fastest"
    )
    default_variant: str = Field(default="", description="variant of requests that name none (empty: the first)")
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda:0...")
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads for torch (0: torch's default, every CPU the process may use: OMP_NUM_THREADS, "
        "the CPU affinity)",
    )
    cpu_isa: str = Field(
        default="",
        description="force the CPU's ISA level the kernels are chosen for (generic, avx2, avx512, avx512_vnni, "
        "avx512_bf16, amx; empty: the CPU's own)",
    )
    batching: Literal["auto", "whole", "scale"] = Field(
        default="auto",
        description="whole: a batch runs all its scales before the next starts; scale: requests join the running "
        "generation at the next scale; auto: scale for transformers 1024 wide or more (d16 and up), else whole "
        "(docs/serving.md#batching-policies)",
    )
    overlap_decode: bool = Field(
        default=True,
        description="scale policy: decode finished images in a thread of their own while the next step runs",
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=256, description="most images computed in one batch (scale: in flight at once)"
    )
    max_wait_ms: float = Field(default=5.0, ge=0, description="longest wait of the oldest image for a fuller batch")
    queue_capacity: int = Field(default=64, ge=1, description="most images waiting; beyond it requests get 429")
    max_images_per_request: int = Field(default=16, ge=1, description="upper limit of num_images")
    max_body_bytes: int = Field(default=16_384, ge=256, description="larger request bodies get 413")
    default_timeout_s: float = Field(default=60.0, gt=0, description="deadline of requests that give no timeout_s")
    max_timeout_s: float = Field(default=600.0, gt=0, description="upper limit of timeout_s")
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM, time given to accepted work")
    watchdog_s: float = Field(
        default=120.0,
        gt=0,
        description="a batch running longer than this and 10 times the running mean of a batch's seconds counts "
        "as stuck: /healthz answers 503 so that the process gets restarted",
    )
    warmup: bool = Field(
        default=True,
        description="run each variant before it serves: an eager one once at batch 1, a compiled one at each batch "
        "size that compiles graphs of its own",
    )
    compile_cache: Path | None = Field(
        default=None,
        description="a file of compiled code (torch's portable compile cache): loaded before the first compiled "
        "variant warms up, written after the variants started when it does not exist yet; it serves the same torch "
        "version and CPU kind (empty: none)",
    )
    calibrate_missing_plans: bool = Field(
        default=True,
        description="a window or sharing plan that a variant takes and the checkpoint folder lacks "
        "(window_plan.safetensors, sharing_plan.safetensors): true, calibrated in the background while the other "
        "variants serve, then saved beside the checkpoint when the folder is writable; false, such variants fail "
        "naming the command that saves one",
    )
    fidelity_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="share of the requests of other variants whose first image is scored against fidelity_reference "
        "while the engine is idle, on /metrics (docs/serving.md#shadow-fidelity; 0: off)",
    )
    fidelity_reference: str = Field(
        default="baseline",
        description="the variant shadow fidelity scores the others against; off when it is not among variants",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    log_level: str = Field(default="info", description="uvicorn and app log level")
    access_log: bool = Field(
        default=False,
        description="uvicorn's log line per request (off: /metrics counts every answer by variant and status; a "
        "line per request was a fifth of a refusal's CPU under overload)",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default=[],
        description=f"comma-separated keys that may call the API (sent as Authorization: Bearer KEY, or X-API-Key: "
        f"KEY), each at least {MIN_API_KEY_CHARS} characters; empty: no key needed",
    )
    protect_ops: bool = Field(
        default=False,
        description="with api_keys, also require a key for /healthz, /readyz and /metrics (probes and Prometheus "
        "then need one)",
    )
    limit_concurrency: int = Field(
        default=0,
        ge=0,
        description="most open connections and requests; beyond it uvicorn answers 503 (0: queue_capacity + "
        "max_batch_size + 64, room for a full queue, a batch, probes and scrapes)",
    )
    backlog: int = Field(
        default=256,
        ge=1,
        description="connections the kernel holds before they are accepted: at least the default "
        "limit_concurrency (136), so a burst the service could take is not refused (Linux caps it at somaxconn)",
    )
    keep_alive_s: int = Field(
        default=5,
        ge=1,
        description="an idle keep-alive connection is closed after this (uvicorn's default; raise it above a "
        "load balancer's idle timeout)",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="request line and headers not complete this long after the connection opened (or after a "
        "later request's first byte) get 408 and a closed connection (slow headers); clients send them at once",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request body not received within this after the headers gets 408 and a closed connection "
        "(slow bodies); max_body_bytes at 56 kbit/s takes 2.3 s",
    )
    max_header_bytes: int = Field(
        default=16_384,
        ge=1024,
        description="largest request line plus headers; larger get 431 and a closed connection (h11's default; "
        "this API's requests send under 1 KiB)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, values: Any) -> Any:
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ValueError(
                f"unknown {ENV_PREFIX}* environment variables: {', '.join(unknown)}; the settings are "
                f"{', '.join(sorted(known_variables()))} (docs/serving.md#settings)"
            )
        return values

    @field_validator("variants", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("compile_cache", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("api_keys")
    @classmethod
    def _long_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        short = [i for i, k in enumerate(keys) if len(k.get_secret_value()) < MIN_API_KEY_CHARS]
        if short:  # names positions, never the keys themselves
            raise ValueError(f"API keys at positions {short} are shorter than {MIN_API_KEY_CHARS} characters")
        return keys

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty list from {sorted(VARIANTS)}, got {self.variants}")
        if self.fidelity_reference not in VARIANTS:
            raise ValueError(f"fidelity_reference must be one of {sorted(VARIANTS)}, got {self.fidelity_reference!r}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {self.variants}")
        if self.cpu_isa and self.cpu_isa not in LEVELS:
            raise ValueError(f"cpu_isa must be one of {', '.join(LEVELS)} or empty, got {self.cpu_isa!r}")
        if not self.default_variant:
            self.default_variant = self.variants[0]
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of variants {self.variants}")
        if self.max_images_per_request > self.queue_capacity:
            raise ValueError("max_images_per_request must not exceed queue_capacity (such a request could never queue)")
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        if self.api_keys and self.log_level.lower() == "trace":
            raise ValueError("log_level trace writes every request's headers, API keys included: use debug")
        if self.limit_concurrency and self.limit_concurrency <= self.queue_capacity + self.max_batch_size:
            raise ValueError(
                "limit_concurrency must exceed queue_capacity + max_batch_size (else uvicorn answers 503 before "
                "the queue could ever be full)"
            )
        return self

    @property
    def connection_limit(self) -> int:
        """limit_concurrency, or its default: a full queue of one-image requests, a batch, 64 more for probes,
        scrapes, /models and requests being refused."""
        return self.limit_concurrency or self.queue_capacity + self.max_batch_size + 64


def known_variables() -> set[str]:
    return {f"{ENV_PREFIX}{name}".upper() for name in ServeSettings.model_fields}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The environment's VAR_* names (any case, as pydantic-settings matches them) that name no setting, each
    with the closest setting when one is close."""
    known = known_variables()
    found = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found
