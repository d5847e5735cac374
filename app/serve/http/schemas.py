"""Request and response bodies. Static limits are pydantic Field constraints; the limits that depend on the
loaded model or the settings (class range, vocabulary, images per request...) are checked in `limits`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.serve.engine.variants import VariantState

SEED_MAX = 2**53 - 1  # the largest integer a JSON number carries exactly in every client (JavaScript included)
CFG_MAX = 100.0
ImageFormat = Literal["png", "jpeg", "webp"]


class GenerateRequest(BaseModel):
    # strict: "3" is not 3; forbid: an unknown field is an error, never silently dropped; allow_inf_nan: off, so
    # that NaN, Infinity and numbers beyond a double (1e400, which JSON parses as infinity) are 422 naming the field
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class_label: int | None = Field(default=None, ge=0, description="class index; give this or class_name")
    class_name: str | None = Field(default=None, description="one of the model's class names (GET /models)")
    num_images: int = Field(default=1, ge=1, description="images of this class; at most max_images_per_request")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="seed of image 0; image i uses seed + i; random if omitted",
    )
    cfg: float | None = Field(default=None, ge=0, le=CFG_MAX, description="guidance scale; model default if omitted")
    top_k: int | None = Field(default=None, ge=0, description="0 = off; at most the vocabulary size")
    top_p: float | None = Field(default=None, ge=0, le=1, description="0 = off")
    more_smooth: bool | None = Field(default=None, description="Gumbel-softmax code mixing (smoother, less detailed)")
    variant: str | None = Field(default=None, description="a loaded variant (GET /models); default if omitted")
    format: ImageFormat = Field(default="png", description="image encoding")
    timeout_s: float | None = Field(default=None, gt=0, description="504 if not done by then; at most max_timeout_s")


class GeneratedImage(BaseModel):
    seed: int
    data: str = Field(description="the encoded image, base64")


class Timings(BaseModel):
    """Milliseconds per stage (`app.model.timing.Stage`: one `<stage>_ms` field each), queueing and total."""

    queued_ms: float = Field(description="arrival to the start of the request's first batch")
    transformer_ms: float
    sampling_ms: float
    latent_ms: float
    decode_ms: float
    encode_ms: float
    total_ms: float = Field(description="arrival of the request to the answer being ready")


class GenerateResponse(BaseModel):
    variant: str
    class_label: int
    class_name: str | None
    format: ImageFormat
    media_type: str
    images: list[GeneratedImage]
    timings: Timings
    batch_sizes: list[int] = Field(description="images per batch that computed this request's images")


# Error bodies, as the OpenAPI document describes them (`openapi.py`); `errors.py` writes them.


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, naming the setting or limit involved")


class FailureBody(ErrorBody):
    error_id: str = Field(description="the id in the log line that holds the cause")


class FieldError(BaseModel):
    type: str = Field(description="pydantic's error type, e.g. less_than_equal, finite_number, json_invalid")
    loc: list[str | int] = Field(description='where: ["body", field] (["body", offset] for JSON that does not parse)')
    msg: str = Field(description="the rule broken, with its limit")
    input: Any = Field(
        default=None,
        description="the value given; left out when it is not finite, nested deeper than 4 or not text",
    )
    ctx: dict[str, Any] | None = Field(default=None, description='the limit, e.g. {"le": 1}')


class ValidationErrorBody(BaseModel):
    detail: list[FieldError] = Field(description="every violation at once")


class ProgressBody(BaseModel):
    step: int = Field(description="the step in progress, from 1")
    steps: int
    fraction: float = Field(description="share of the work done, 0 to 1 (steps weighted by their cost)")
    elapsed_s: float
    left_s: float | None = Field(description="estimate of the seconds left; null before a first step is done")


class VariantStateBody(BaseModel):
    state: VariantState
    doing: str | None = Field(description="what it does or waits for, while it starts")
    progress: ProgressBody | None = Field(description="while it calibrates or warms up")
    error: str | None = Field(description="why it failed")


class HealthBody(BaseModel):
    status: str = Field(description="alive, ready, or why not: loading, draining, failed...")
    reason: str | None = Field(default=None, description="why the process should be restarted")
    error: str | None = Field(default=None, description="the cause, when there is one")
    variants: dict[str, VariantStateBody] | None = Field(
        default=None, description="/readyz: each configured variant's state; a variant serves once ready"
    )
