"""Request and response bodies of the HTTP API, with AUTOMATIC1111's field names and types.

Only the fields the server acts on are declared; any other field a client sends is ignored, as
A1111 ignores what it does not know. A handful of A1111 features that would change the picture
and that this server does not have (hires fix, face restoration, tiling, variation seeds, named
styles, scripts) are declared so that asking for them is a 422 naming the field, not an image
made without them. Limits that depend on the server (largest size, most steps) are checked by
`ldm.serve.a1111`, with errors in the same shape as these models' validation errors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Features of A1111 this server does not implement, asked for by any truthy value: (field, what to do).
UNSUPPORTED = (
    ("enable_hr", "hires fix is not available; generate at the size you want, or upscale afterwards"),
    ("restore_faces", "face restoration is not available; leave it false"),
    ("tiling", "tiling is not available; leave it false"),
    ("subseed_strength", "variation seeds are not available; leave subseed_strength at 0"),
    ("styles", "this server has no saved prompt styles; put the style's words in the prompt"),
    ("script_name", "scripts are not available; leave script_name empty"),
    ("alwayson_scripts", "extension scripts are not available; leave alwayson_scripts empty"),
)


class _Body(BaseModel):
    """Unknown fields are ignored (A1111 behaviour); values are validated with the field's name."""

    model_config = ConfigDict(extra="ignore")


class GenerationRequest(_Body):
    """What txt2img and img2img share. Fields left out take the loaded model's defaults (its
    config's `sample:` section) where A1111 has fixed ones (512x512, 50 steps, cfg 7)."""

    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = Field(default=-1, ge=-1, description="-1: random; image k of the request uses seed + k")
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None  # the spacing of the noise levels; None: the sampler's own
    steps: int | None = Field(default=None, ge=1)
    cfg_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    eta: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    override_settings: dict[str, Any] | None = None  # honours sd_model_checkpoint
    force_task_id: str | None = Field(default=None, max_length=128)
    send_images: bool = True
    save_images: bool = False
    # asked-for features this server does not have: rejected when set (see UNSUPPORTED)
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float = 0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


class Txt2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/txt2img."""


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img: init_images (base64, one for all or one per image), optional mask."""

    init_images: list[str] | None = None
    denoising_strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
    resize_mode: int = Field(default=0, ge=0, le=3, description="0 stretch, 1 crop, 2 fill, 3 latent (not available)")
    mask: str | None = None
    mask_blur: int | None = Field(default=None, ge=0, le=64)
    mask_blur_x: int = Field(default=4, ge=0, le=64)
    mask_blur_y: int = Field(default=4, ge=0, le=64)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    """The response of txt2img and img2img: base64 PNGs, the request as understood, and the
    generation info as a JSON string (prompt, seeds, sampler, `infotexts` per image)."""

    images: list[str] = Field(description="the images as base64 PNG, settings in their text chunks")
    parameters: dict[str, Any]
    info: str


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress: of one request (`task_id`) or of the batch running now."""

    progress: float = Field(ge=0, le=1)
    eta_relative: float = Field(description="seconds until done, estimated")
    state: dict[str, Any]
    current_image: str | None = Field(default=None, description="preview of the current image, base64 PNG")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str]


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None
