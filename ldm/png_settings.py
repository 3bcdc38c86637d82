"""The settings a generated PNG records, written so that other tools read them, and read back.

A PNG written by the tools carries two text chunks:

- `parameters`: AUTOMATIC1111's infotext, in its exact format, which A1111's PNG Info, ComfyUI's
  loader (it builds a workflow from it), image hosts and taggers read (the third line is one line):

      a red circle
      Negative prompt: blurry
      Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512,
      Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

  Values holding a comma, colon or line break are JSON-quoted, as A1111 quotes them. The
  `Negative prompt:` line is always written (empty when there is none): ComfyUI imports the text
  only when it has one.
- `ldm`: our own settings as JSON (`{"format": 1, "options": {...}, "model": {...}, "runtime": {...}}`):
  every `SamplingOptions` field of the image, where its model came from, its device and dtype. This
  is what `settings_from_png` reads to make the same image again, bit for bit.

There is no `prompt` or `workflow` chunk: ComfyUI parses those as its own JSON workflows and fails on
anything else. `read_png_settings` also reads PNGs made by A1111 (their `parameters`; the fields
it cannot reproduce are listed in `.ignored`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .diffusion import STOCHASTIC_SAMPLERS, a1111_name, parse_sampler
from .images import png_text_chunks
from .options import LATENT_UPSCALER, SamplingOptions

PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's chunk
SETTINGS_KEY = "ldm"  # ours
SETTINGS_FORMAT = 1
A1111_HASH_DIGITS = 10  # A1111's "Model hash": the first 10 hex digits of the file's SHA-256
A1111_LORA_HASH_DIGITS = 12  # its "Lora hashes": 12 digits per file
# A1111 labels of guidance rescale: the CFG Rescale extensions', and SD.Next's.
CFG_RESCALE_LABELS = ("CFG Rescale", "CFG Rescale phi", "CFG Rescale φ", "CFG rescale")
# A1111 fields whose meaning is read into SamplingOptions (or the model); the rest are reported.
_READ = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Eta", "Eta DDIM",
         "Model hash", "Model", "VAE hash", "VAE", "Version", "Noise level", *CFG_RESCALE_LABELS}
HIRES_LABELS = ("Hires upscale", "Hires steps", "Hires upscaler")
A1111_LATENT = "Latent"  # A1111's label of hires fix's latent upscaler (bilinear, as ours)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def a1111_quote(value: object) -> str:
    """A value as A1111 writes it: as is, or JSON-quoted when it holds a comma, colon or line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(info: Mapping[str, Any], model: Mapping[str, Any] | None = None,
                     extra: Mapping[str, object] | None = None) -> str:
    """A1111's infotext of one image whose settings are `info` (a generated image's `image.info`:
    resolved `SamplingOptions` fields) made with `model` (`ModelSource.record()`: name, sha256, vae,
    vae_sha256; and `pipe.adapters_record()`'s loras). `extra`: further `Label: value` fields,
    written last as A1111 writes its extensions'."""
    model = model or {}
    sampler, spacing = info.get("sampler"), info.get("spacing")
    try:
        sampler_label, schedule_label = a1111_name(sampler, spacing)
    except ValueError:  # a sampler A1111 lacks (ddpm): our own names
        sampler_label, schedule_label = sampler, spacing
    fields: dict[str, object] = {
        "Steps": info.get("steps"),
        "Sampler": sampler_label,
        "Schedule type": schedule_label,
        "CFG scale": info.get("cfg"),
        "Seed": info.get("seed"),
        "Size": f"{info['width']}x{info['height']}" if "width" in info and "height" in info else None,
        "Model hash": (model.get("sha256") or "")[:A1111_HASH_DIGITS] or None,
        "Model": model.get("name"),
        "VAE hash": (model.get("vae_sha256") or "")[:A1111_HASH_DIGITS] or None,
        "VAE": Path(model["vae"]).name if model.get("vae") else None,
        "Denoising strength": info.get("strength"),
        "Noise level": info.get("noise_level"),  # an upscale's
    }
    if info.get("hires_scale") is not None:  # A1111's hires fix fields, the base size in Size
        upscaler = str(info.get("hires_upscaler") or LATENT_UPSCALER)
        fields.update({"Hires upscale": info["hires_scale"], "Hires steps": info.get("hires_steps"),
                       "Hires upscaler": A1111_LATENT if upscaler == LATENT_UPSCALER else Path(upscaler).name})
    loras = [lora for lora in model.get("loras", ()) if lora.get("sha256")]
    if loras:  # A1111 writes each LoRA's name without commas and colons, and a short hash of its file
        fields["Lora hashes"] = ", ".join(
            f"{lora['name'].replace(':', '').replace(',', '')}: {lora['sha256'][:A1111_LORA_HASH_DIGITS]}"
            for lora in loras)
    eta = info.get("eta")
    if eta is not None:  # A1111 writes eta only where it differs from its sampler's default
        if sampler == "ddim" and eta != 0:
            fields["Eta DDIM"] = eta
        elif sampler != "ddim" and eta != 1:
            fields["Eta"] = eta
    if info.get("guidance_rescale"):
        fields["CFG Rescale"] = info["guidance_rescale"]
    fields.update(extra or {})
    params = ", ".join(f"{label}: {a1111_quote(value)}" for label, value in fields.items() if value is not None)
    return f"{info.get('prompt', '')}\nNegative prompt: {info.get('negative_prompt') or ''}\n{params}"


def png_text(info: Mapping[str, Any], model: Mapping[str, Any] | None = None, *,
             runtime: Mapping[str, Any] | None = None, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The text chunks of a generated image: A1111's `parameters` and our JSON `ldm` chunk (the
    image's options, `model` as `ModelSource.record()` gives it, `runtime`: device and dtype)."""
    options = {k: v for k, v in info.items() if k in SamplingOptions.names()}
    settings = {"format": SETTINGS_FORMAT, "options": options, "model": dict(model or {}),
                "runtime": dict(runtime or {})}
    return {
        PARAMETERS_KEY: a1111_parameters(options, model, extra),
        SETTINGS_KEY: json.dumps(settings, ensure_ascii=False, sort_keys=True),
    }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class PngSettings:
    """What a PNG says about how it was made. `source`: "ldm" (our JSON chunk: exact) or "a1111" (a
    `parameters` text: the same settings, not the same pixels: its noise comes from another RNG).
    `model`: our record of the model (name, path, sha256, format, config, vae, ...) or, from A1111,
    its name and short hash. `ignored`: A1111 fields with no equivalent here, as written."""

    options: SamplingOptions
    source: str
    model: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)


def read_png_settings(path: str | Path) -> PngSettings:
    """The settings recorded in the PNG at `path`: our `ldm` chunk when present, else A1111's
    `parameters`. Raises ValueError naming the file when it records neither."""
    return settings_from_chunks(png_text_chunks(path), path)


def settings_from_chunks(chunks: Mapping[str, str], path: str | Path = "the image") -> PngSettings:
    """`read_png_settings` of a PNG whose text chunks (PIL's `image.text`) are `chunks`; `path` names
    it in errors."""
    if SETTINGS_KEY in chunks:
        return _from_ours(chunks[SETTINGS_KEY], path)
    if PARAMETERS_KEY in chunks:
        try:
            return settings_from_a1111(chunks[PARAMETERS_KEY])
        except ValueError as e:
            raise ValueError(f"{path}: its A1111 parameters cannot be used: {e}") from None
    found = f" (it has {', '.join(sorted(chunks))})" if chunks else ""
    comfy = ("; it is a ComfyUI image, whose settings are a node graph: give its KSampler's values as flags"
             if {"workflow", "prompt"} & set(chunks) else "")
    raise ValueError(f"{path} records no generation settings: no '{SETTINGS_KEY}' or '{PARAMETERS_KEY}' text "
                     f"chunk{found}{comfy}")


def settings_from_png(path: str | Path) -> SamplingOptions:
    """The sampling options recorded in a PNG (ours, or A1111's): `pipe.generate(**options.to_dict())`
    with the same model makes the same image (ours: bit for bit on the same device and dtype)."""
    return read_png_settings(path).options


def _from_ours(text: str, path: str | Path) -> PngSettings:
    try:
        data = json.loads(text)
        version = data.get("format")
        if version != SETTINGS_FORMAT:
            raise ValueError(f"settings format {version!r} is not the one this version reads ({SETTINGS_FORMAT})")
        options = SamplingOptions.from_dict(data["options"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: its '{SETTINGS_KEY}' settings chunk is not readable ({e})") from None
    return PngSettings(options, "ldm", dict(data.get("model") or {}), dict(data.get("runtime") or {}))


def parse_a1111(text: str) -> dict[str, str]:
    """A1111's infotext -> {"Prompt": ..., "Negative prompt": ..., label: value, ...} (values as
    written, JSON-quoted ones unquoted). The last line holds the fields when it starts with
    `Steps:` or has at least three `Label: value` pairs; every line before it is the prompt, up to
    the line starting `Negative prompt:`, after which they are the negative prompt."""
    *lines, last = text.strip().split("\n")
    fields = _split_fields(last)
    if not (last.startswith("Steps:") or len(fields) >= 3):
        lines, fields = [*lines, last], {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip(), **fields}


def _split_fields(line: str) -> dict[str, str]:
    """`Label: value, Label: "quoted, value", ...` -> {label: value}."""
    fields: dict[str, str] = {}
    i, n = 0, len(line)
    decoder = json.JSONDecoder()
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        label = line[i:colon].strip()
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        value = None
        if j < n and line[j] == '"':
            try:
                value, j = decoder.raw_decode(line, j)
            except json.JSONDecodeError:
                value = None
        if value is None:
            end = line.find(",", j)
            end = n if end < 0 else end
            value, j = line[j:end].strip(), end
        fields[label] = str(value)
        i = j + 1 if j < n and line[j] == "," else j
    return fields


def settings_from_a1111(text: str) -> PngSettings:
    """A1111's infotext as our settings: prompt, negative prompt, steps, sampler and schedule type,
    CFG scale, seed, size, denoising strength, eta, CFG rescale, an upscale's noise level, and hires
    fix with the Latent upscaler (A1111's hires fix with another upscaler is not ours: its fields
    and strength are reported as ignored). A missing schedule type is A1111's "Automatic". Raises
    ValueError for an unknown sampler or a malformed number, naming it."""
    f = parse_a1111(text)
    hires = any(label.startswith("Hires") for label in f)
    latent_hires = hires and "Hires upscale" in f and f.get("Hires upscaler", A1111_LATENT) == A1111_LATENT
    sampler = f.get("Sampler")
    choice = parse_sampler(sampler, f.get("Schedule type", "Automatic")) if sampler else None
    values: dict[str, Any] = {"prompt": f["Prompt"], "negative_prompt": f["Negative prompt"]}
    if choice is not None:
        values.update(sampler=choice.sampler, spacing=choice.spacing)
    for label, name, kind in (("Steps", "steps", int), ("CFG scale", "cfg", float), ("Seed", "seed", int)):
        if label in f:
            values[name] = _number(f, label, kind)
    if "Size" in f:
        width, _, height = f["Size"].partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(f"Size must be WIDTHxHEIGHT (got {f['Size']!r})")
        values.update(width=int(width), height=int(height))
    if "Denoising strength" in f and (latent_hires or not hires):
        values["strength"] = _number(f, "Denoising strength", float)
    if "Noise level" in f:
        values["noise_level"] = _number(f, "Noise level", int)
    if latent_hires:
        hires_steps = int(_number(f, "Hires steps", int)) if "Hires steps" in f else 0
        values.update(hires_scale=_number(f, "Hires upscale", float), hires_upscaler=LATENT_UPSCALER,
                      hires_steps=hires_steps or None)  # A1111's 0: as many as the first pass
    eta_label = "Eta DDIM" if choice is not None and choice.sampler == "ddim" else "Eta"
    if eta_label in f and choice is not None and choice.sampler in STOCHASTIC_SAMPLERS:
        values["eta"] = _number(f, eta_label, float)
    rescale = next((label for label in CFG_RESCALE_LABELS if label in f), None)
    if rescale:
        values["guidance_rescale"] = _number(f, rescale, float)
    model = {key: f[label] for key, label in (("name", "Model"), ("hash", "Model hash"), ("vae", "VAE"),
                                              ("vae_hash", "VAE hash")) if label in f}
    used = (_READ | set(HIRES_LABELS)) if latent_hires else _READ - ({"Denoising strength"} if hires else set())
    ignored = {label: value for label, value in f.items() if label not in used and label not in ("Prompt",
                                                                                                  "Negative prompt")}
    for label in ("Eta", "Eta DDIM"):
        if label in f and "eta" not in values:
            ignored[label] = f[label]
    return PngSettings(SamplingOptions(**values), "a1111", model, {}, ignored)


def _number(fields: Mapping[str, str], label: str, kind: type) -> int | float:
    try:
        return kind(fields[label])
    except ValueError:
        raise ValueError(f"{label} must be {'an integer' if kind is int else 'a number'} "
                         f"(got {fields[label]!r})") from None
