"""The AUTOMATIC1111 protocol: request bodies -> queue jobs (checked), pictures -> response bodies.

Every check happens here, before a job enters the queue, so a bad request never costs a batch
anything: unsupported features, unknown models and samplers, sizes, step and picture counts,
seeds, and the init images and mask (base64, decodable, not too large). Errors are `BadRequest`s
naming the field the way FastAPI's validation errors do (`loc: ["body", "width"]`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image, ImageFilter, ImageOps

from ..diffusion import STOCHASTIC_SAMPLERS, parse_sampler
from ..diffusion.names import A1111_AUTOMATIC, A1111_SAMPLERS, a1111_name
from ..images import decode_grey, decode_image, png_text_info
from ..models.prompt_encoder import chunk_count
from ..pipeline import MAX_SEED
from ..png_settings import png_text
from ..prompts import PromptSyntaxError
from .catalog import ModelCatalog, ModelEntry
from .queue import BatchKey, ImageTask, Job, JobResult
from .schemas import UNSUPPORTED, GenerationRequest, Img2ImgRequest

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}


class BadRequest(Exception):
    """A request the server refuses before queueing it: HTTP `status`, naming `field`."""

    def __init__(self, field: str | tuple, message: str, status: int = 422):
        super().__init__(message)
        self.loc = ["body", *(field if isinstance(field, tuple) else (field,))]
        self.status = status

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": str(self), "type": "value_error"}]


@dataclass
class Limits:
    """What one request may ask for."""

    max_size: int | None = None  # pixels per side; None: set by the server from memory when it loads the model
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_input_pixels: int = 8192 * 8192  # an init image or mask, before resizing (a 64 MP photo)


def request_job(req: GenerationRequest, catalog: ModelCatalog, limits: Limits) -> tuple[Job, ModelEntry]:
    """Check `req` and turn it into a queue job (txt2img, img2img or inpaint)."""
    for name, advice in UNSUPPORTED:
        if getattr(req, name, None):
            raise BadRequest(name, advice)
    entry = _model(req, catalog)
    d, f = entry.cfg.sample, entry.cfg.model.vae.downsample_factor
    sampler, spacing = _sampler(req, d.sampler)
    steps = d.steps if req.steps is None else req.steps
    if steps > limits.max_steps:
        raise BadRequest("steps", f"at most {limits.max_steps} steps (got {steps})")
    count = req.batch_size * req.n_iter
    if count > limits.max_images:
        raise BadRequest("batch_size", f"batch_size x n_iter is {count} images; this server makes at most "
                                       f"{limits.max_images} per request: send several requests")
    seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
    if seed + count - 1 > MAX_SEED:
        raise BadRequest("seed", f"seed + number of images must stay below 2**63 (got {req.seed})")
    negative = d.negative_prompt if req.negative_prompt is None else req.negative_prompt
    tasks = [ImageTask(req.prompt, negative, seed + k) for k in range(count)]

    inits, mask = None, None
    if isinstance(req, Img2ImgRequest):
        inits, mask, size = _img2img_inputs(req, f, limits)
    else:
        size = (req.width or d.width, req.height or d.height)
    width, height = _check_size(size, f, limits)
    strength = None
    if inits is not None:
        mode, strength = ("inpaint" if mask is not None else "img2img"), float(req.denoising_strength)
        for k, task in enumerate(tasks):
            task.init_image = _resize(inits[k % len(inits)], width, height, req.resize_mode)
            task.mask = _resize(mask, width, height, req.resize_mode) if mask is not None else None
    else:
        mode = "txt2img"
    cfg = d.cfg if req.cfg_scale is None else req.cfg_scale
    eta = req.eta if sampler in STOCHASTIC_SAMPLERS else None  # A1111 ignores it elsewhere
    key = BatchKey(model=entry.title, mode=mode, width=width, height=height, steps=steps, sampler=sampler,
                   spacing=spacing, cfg=float(cfg), eta=eta, strength=strength,
                   chunks=_chunks(entry, req.prompt, negative))
    return Job(key, tasks, job_id=req.force_task_id), entry


def _chunks(entry: ModelEntry, prompt: str, negative: str) -> int:
    """The chunk count of a prompt and its negative prompt (long prompts, BREAK): pictures share U-Net
    calls only with pictures of the same count, whose contexts have the same length, so that each
    equals its solo run. A prompt the weighting syntax cannot read is refused here."""
    counts = []
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        try:
            counts.append(chunk_count(text, entry.cfg.model.text_encoder))
        except PromptSyntaxError as e:
            raise BadRequest(field, str(e)) from None
    return max(counts)


def _model(req: GenerationRequest, catalog: ModelCatalog) -> ModelEntry:
    name = (req.override_settings or {}).get("sd_model_checkpoint")
    if name is None:
        return catalog.entries[catalog.current]
    try:
        return catalog.find(str(name))
    except ValueError as e:
        raise BadRequest(("override_settings", "sd_model_checkpoint"), str(e)) from None


def _sampler(req: GenerationRequest, default: str) -> tuple[str, str | None]:
    """(our sampler, spacing or None for the model's default) from sampler_name (or sampler_index) and
    scheduler, in A1111's, ComfyUI's or our names. An A1111 sampler name without a scheduler means
    A1111's "Automatic" schedule type for that sampler (Karras for DPM++ 2M), as in A1111."""
    field = "sampler_name" if req.sampler_name else "sampler_index"
    name = req.sampler_name or req.sampler_index or default
    try:
        choice = parse_sampler(name, req.scheduler)
    except ValueError as e:
        bad_schedule = req.scheduler is not None and "schedule" in str(e).split(";")[0]
        raise BadRequest("scheduler" if bad_schedule else field, str(e)) from None
    spacing = choice.spacing
    if spacing is None and name in A1111_SAMPLERS:
        spacing = A1111_AUTOMATIC[choice.sampler]
    return choice.sampler, spacing


def a1111_sampler_label(sampler: str, spacing: str | None) -> str:
    """How A1111 would name what ran: "DPM++ 2M" (its schedule type goes in its own field); our
    name for a sampler A1111 lacks (ddpm)."""
    try:
        return a1111_name(sampler, spacing or "trailing")[0]
    except ValueError:
        return sampler


def _check_size(size: tuple[int, int], f: int, limits: Limits) -> tuple[int, int]:
    for name, v in zip(("width", "height"), size):
        if v > _max_size(limits):
            raise BadRequest(name, f"{name} must be at most {_max_size(limits)} (got {v})")
        if v < f or v % f:
            lo, hi = max(f, v - v % f), v - v % f + f
            raise BadRequest(name, f"{name} must be a multiple of {f} (got {v}); try {lo} or {hi}")
    return size


def _max_size(limits: Limits) -> int:
    return limits.max_size or 2048  # None only until the server has loaded its model


def _img2img_inputs(req: Img2ImgRequest, f: int, limits: Limits):
    """Decoded init images and mask, and the output size (given, or the first image's)."""
    if not req.init_images:
        raise BadRequest("init_images", "img2img needs at least one init image (base64 PNG or JPEG)")
    if len(req.init_images) not in (1, req.batch_size):
        raise BadRequest("init_images", f"send 1 init image or batch_size ({req.batch_size}) of them "
                                        f"(got {len(req.init_images)})")
    if req.resize_mode not in RESIZE_MODES:
        raise BadRequest("resize_mode", f"resize_mode {req.resize_mode} (latent upscale) is not available; "
                                        "use 0 (just resize), 1 (crop and resize) or 2 (resize and fill)")
    inits = [decode_image(_image_bytes(s, ("init_images", i), limits)) for i, s in enumerate(req.init_images)]
    mask = None
    if req.mask:
        mask = decode_grey(_image_bytes(req.mask, "mask", limits))
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        bx, by = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
        if bx or by:
            mask = mask.filter(ImageFilter.GaussianBlur((bx, by)))
    if req.width is not None and req.height is not None:
        return inits, mask, (req.width, req.height)
    w, h = inits[0].size
    scale = min(1.0, _max_size(limits) / max(w, h))  # large photos: the largest size that fits the limit
    fit = lambda v: max(f, int(v * scale) // f * f)  # noqa: E731
    return inits, mask, (req.width or fit(w), req.height or fit(h))


def _image_bytes(data: str, field: str | tuple, limits: Limits) -> bytes:
    """Base64 (or a data: URL) -> image file bytes, refusing what is not an image or too large."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(field, "is not valid base64 (send the image file's bytes base64-encoded, "
                                "optionally as a data: URL)") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            w, h = im.size
    except Exception:
        raise BadRequest(field, "is base64 but not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    if w * h > limits.max_input_pixels:
        raise BadRequest(field, f"the image is {w}x{h} pixels; at most {limits.max_input_pixels} pixels are "
                                "accepted: scale it down first", status=413)
    return raw


def _resize(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 0 stretch, 1 cover and centre-crop, 2 fit and fill the rest with
    the picture's stretched edges."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    scale = min(width / image.width, height / image.height)
    w, h = min(width, max(1, round(image.width * scale))), min(height, max(1, round(image.height * scale)))
    left, top = (width - w) // 2, (height - h) // 2
    out = Image.new(image.mode, (width, height))
    out.paste(image.resize((w, h), Image.LANCZOS), (left, top))
    # gaps above and below, then left and right: the nearest row or column, stretched
    for box, edge in (((left, 0, left + w, top), (left, top, left + w, top + 1)),
                      ((left, top + h, left + w, height), (left, top + h - 1, left + w, top + h)),
                      ((0, 0, left, height), (left, 0, left + 1, height)),
                      ((left + w, 0, width, height), (left + w - 1, 0, left + w, height))):
        if box[2] > box[0] and box[3] > box[1]:
            out.paste(out.crop(edge).resize((box[2] - box[0], box[3] - box[1])), box[:2])
    return out


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def encode_png(image: Image.Image, model: Mapping[str, Any] | None) -> bytes:
    """PNG bytes with the settings in the text chunks the command-line tools write (A1111's
    `parameters` and our JSON; `model` as `ModelEntry.record()` gives it)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_text_info(png_text(image.info, model)))
    return buf.getvalue()


def images_response(job: Job, result: JobResult, req: GenerationRequest, entry: ModelEntry) -> dict[str, Any]:
    """The A1111 response body: base64 PNGs, the request's parameters, and the info JSON string."""
    key = job.key
    pngs, infotexts = [], []
    for k, image in enumerate(result.images):
        task = job.tasks[k]
        for name, value in _image_info(key, task).items():
            image.info.setdefault(name, value)
        data = encode_png(image, entry.record())
        pngs.append(base64.b64encode(data).decode("ascii"))
        infotexts.append(Image.open(io.BytesIO(data)).text.get("parameters", ""))
    seeds = [t.seed for t in job.tasks[: len(result.images)]] or [job.tasks[0].seed]
    info = {
        "prompt": job.tasks[0].prompt, "all_prompts": [t.prompt for t in job.tasks[: len(seeds)]],
        "negative_prompt": job.tasks[0].negative_prompt,
        "all_negative_prompts": [t.negative_prompt for t in job.tasks[: len(seeds)]],
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": key.width, "height": key.height,
        "sampler_name": a1111_sampler_label(key.sampler, key.spacing),
        "cfg_scale": key.cfg, "steps": key.steps, "batch_size": req.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": entry.model_name, "sd_model_hash": entry.shorthash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": key.strength or 0, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": key.mode == "inpaint", "version": "ldm",
        "task_id": job.id, "interrupted": result.interrupted,
    }
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = parameters["mask"] = None
    return {"images": pngs if req.send_images else [], "parameters": parameters, "info": json.dumps(info)}


def _image_info(key: BatchKey, task: ImageTask) -> dict[str, Any]:
    """The settings of one picture, as the pipeline writes them into `image.info`."""
    info = {"prompt": task.prompt, "negative_prompt": task.negative_prompt, "seed": task.seed,
            "sampler": key.sampler, "spacing": key.spacing or "trailing", "steps": key.steps, "cfg": key.cfg, "width": key.width, "height": key.height}
    if key.strength is not None:
        info["strength"] = key.strength
    return info
