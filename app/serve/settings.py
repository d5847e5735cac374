"""Service settings, read from the environment (prefix `VAR_`); only `app.serve.app` reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.compress import VARIANTS


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAR_", extra="forbid")

    model_dir: Path = Field(default=Path("model_store/demo"), description="checkpoint folder to serve")
    variants: Annotated[list[str], NoDecode] = Field(
        default=["baseline", "litevar"], description="variants to load, e.g. baseline,litevar,fastest"
    )
    default_variant: str = Field(default="", description="variant of requests that name none (empty: the first)")
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda:0...")
    torch_threads: int = Field(default=0, ge=0, description="CPU threads for torch (0: torch's default)")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="most images computed in one batch")
    max_wait_ms: float = Field(default=5.0, ge=0, description="longest wait of the oldest image for a fuller batch")
    queue_capacity: int = Field(default=64, ge=1, description="most images waiting; beyond it requests get 429")
    max_images_per_request: int = Field(default=16, ge=1, description="upper limit of num_images")
    max_body_bytes: int = Field(default=16_384, ge=256, description="larger request bodies get 413")
    default_timeout_s: float = Field(default=60.0, gt=0, description="deadline of requests that give no timeout_s")
    max_timeout_s: float = Field(default=600.0, gt=0, description="upper limit of timeout_s")
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM, time given to accepted work")
    warmup: bool = Field(default=True, description="run every variant at every batch size before becoming ready")
    calibrate_missing_plans: bool = Field(
        default=False,
        description="calibrate a window plan at load for windowed variants of a checkpoint without "
        "window_plan.safetensors (slow; otherwise they refuse to load)",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    log_level: str = Field(default="info", description="uvicorn and app log level")

    @field_validator("variants", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty list from {sorted(VARIANTS)}, got {self.variants}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {self.variants}")
        if not self.default_variant:
            self.default_variant = self.variants[0]
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of variants {self.variants}")
        if self.max_images_per_request > self.queue_capacity:
            raise ValueError("max_images_per_request must not exceed queue_capacity (such a request could never queue)")
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        return self
