"""Request and response bodies. Static limits are pydantic Field constraints; the limits that depend on the
loaded model or the settings (class range, vocabulary, images per request...) are checked in `limits` and
written into the OpenAPI document by `openapi.with_limits`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.config import JsonDict

from app.serve.engine.variants import VariantState

SEED_MAX = 2**53 - 1  # the largest integer a JSON number carries exactly in every client (JavaScript included)
CFG_MAX = 100.0
# The shortest deadline a request may set (docs/serving.md#deadlines). timeout_s runs from admission to the
# encoded answer, so it covers the batching wait and a batch already in flight as well as the generation, which
# alone takes about 0.07 s for one image of the demo model (the smallest) on one CPU core and far longer for
# real models: a shorter deadline could be met, if ever, only by an idle server, and is refused as the client's
# mistake (422) rather than answered 504, a server error, nearly every time. A client that must give up sooner
# closes the connection, which withdraws its images from the queue.
TIMEOUT_MIN_S = 1.0
# Exactly one of the two names the class (the check: `limits.class_label`): each branch requires its field, not
# null, and the other null or absent. The oneOf sits in an allOf: Schemathesis (4.32) mixes the branches of a
# oneOf that stands beside `properties`, and sent both fields as a valid request.
CLASS_BRANCHES: dict[str, JsonDict] = {
    "class_label": {
        "required": ["class_label"],
        "properties": {"class_label": {"type": "integer"}, "class_name": {"type": "null"}},
    },
    "class_name": {
        "required": ["class_name"],
        "properties": {"class_name": {"type": "string"}, "class_label": {"type": "null"}},
    },
}
EXACTLY_ONE_CLASS: JsonDict = {"allOf": [{"oneOf": list(CLASS_BRANCHES.values())}]}
ImageFormat = Literal["png", "jpeg", "webp"]


class GenerateRequest(BaseModel):
    # strict: "3" is not 3; forbid: an unknown field is an error, never silently dropped; allow_inf_nan: off, so
    # that NaN, Infinity and numbers beyond a double (1e400, which JSON parses as infinity) are 422 naming the field
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=EXACTLY_ONE_CLASS)

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
    timeout_s: float | None = Field(
        default=None,
        ge=TIMEOUT_MIN_S,
        description="504 if not done by then (from admission to the encoded answer); at most max_timeout_s",
    )

    @field_validator("class_label", "num_images", "seed", "top_k", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        """A float without a fraction (3.0) as the integer it is: JSON has a single number type, and JSON Schema
        counts 3.0 as an integer. 3.5, "3" and true are still refused."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


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
