// The web page: a form that posts to /sdapi/v1/txt2img, a card per request that polls
// /sdapi/v1/progress for its progress and preview, and a gallery of results with their settings.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 500;

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describe(response.status, data));
  return data;
}

function describe(status, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("\n");
  }
  return `${status}: ${detail || "request failed"}`;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

const samplerNames = {};

async function init() {
  const [samplers, models, options] = await Promise.all([
    api("sdapi/v1/samplers"), api("sdapi/v1/sd-models"), api("sdapi/v1/options"),
  ]);
  for (const s of samplers) {
    $("sampler").add(new Option(s.name, s.name));
    for (const alias of s.aliases) samplerNames[alias] = s.name;  // our names -> the A1111 label listed
  }
  for (const m of models) $("model").add(new Option(m.title, m.title));
  $("model").value = options.sd_model_checkpoint;
  applyDefaults(options.ldm_defaults || {});
  $("status").textContent = `${options.ldm_max_batch} pictures per batch`;
}

function applyDefaults(d) {
  if (d.sampler_name) {
    const name = samplerNames[d.sampler_name] || d.sampler_name;  // e.g. "dpmpp_2m_karras" is listed as itself
    if (![...$("sampler").options].some((o) => o.value === name)) $("sampler").add(new Option(name, name));
    $("sampler").value = name;
  }
  for (const [id, key] of [["steps", "steps"], ["cfg", "cfg_scale"], ["width", "width"], ["height", "height"]]) {
    if (d[key] !== undefined) $(id).value = d[key];
  }
}

function formSettings() {
  const number = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value,
    steps: number("steps"),
    cfg_scale: number("cfg"),
    seed: number("seed"),
    width: number("width"),
    height: number("height"),
    batch_size: number("batch"),
    override_settings: { sd_model_checkpoint: $("model").value },
  };
}

function reuse(settings) {
  $("prompt").value = settings.prompt;
  $("negative").value = settings.negative_prompt || "";
  applyDefaults(settings);
  $("seed").value = settings.seed;
  if (settings.model) $("model").value = settings.model;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function summary(s) {
  const seed = s.seed === -1 ? "random seed" : `seed ${s.seed}`;
  return `${s.prompt}` + (s.negative_prompt ? ` | not: ${s.negative_prompt}` : "") +
    ` | ${seed}, ${s.steps} steps, cfg ${s.cfg_scale}, ${s.sampler_name}, ${s.width}x${s.height}`;
}

function newCard() {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  $("gallery").prepend(card);
  $("empty").hidden = true;
  return card;
}

function setProgress(card, fraction, text) {
  card.querySelector(".bar").style.width = `${Math.round(100 * fraction)}%`;
  card.querySelector(".progress-text").textContent = text;
}

async function poll(card, taskId, isDone) {
  while (!isDone()) {
    try {
      const p = await api(`sdapi/v1/progress?task_id=${encodeURIComponent(taskId)}`);
      if (isDone()) break;
      if (p.state && p.state.job === taskId && p.state.job_count) {
        const eta = p.eta_relative > 0 ? `, about ${Math.ceil(p.eta_relative)} s left` : "";
        setProgress(card, p.progress, `${p.textinfo}${eta}`);
        if (p.current_image) {
          const pictures = card.querySelector(".pictures");
          let img = pictures.querySelector("img.preview");
          if (!img) {
            img = document.createElement("img");
            img.className = "preview";
            img.alt = "preview";
            pictures.replaceChildren(img);
          }
          img.src = `data:image/png;base64,${p.current_image}`;
        }
      }
    } catch (e) { /* a missed poll is harmless: the next one catches up */ }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function showResult(card, request, result) {
  const info = JSON.parse(result.info);
  const pictures = card.querySelector(".pictures");
  pictures.replaceChildren();
  result.images.forEach((b64, k) => {
    const seed = info.all_seeds[k];
    const settings = { ...request, seed, sampler_name: info.sampler_name, steps: info.steps, cfg_scale: info.cfg_scale,
      width: info.width, height: info.height, model: request.override_settings.sd_model_checkpoint };
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = settings.prompt;
    img.title = "click to reuse these settings";
    img.className = "result";
    img.dataset.seed = seed;
    img.addEventListener("click", () => reuse(settings));
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `ldm-${seed}.png`;
    link.textContent = "Download PNG";
    link.className = "download";
    figure.append(img, link);
    pictures.append(figure);
  });
  const first = { ...request, seed: info.all_seeds[0], sampler_name: info.sampler_name, steps: info.steps,
    cfg_scale: info.cfg_scale, width: info.width, height: info.height,
    model: request.override_settings.sd_model_checkpoint };
  card.querySelector(".settings").textContent = summary(first) + (info.interrupted ? " (stopped early)" : "");
  const button = card.querySelector(".reuse");
  button.hidden = false;
  button.addEventListener("click", () => reuse(first));
  card.classList.add("done");
  card.querySelector(".progress-text").textContent = "";
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const request = formSettings();
  const taskId = `page-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  request.force_task_id = taskId;
  const card = newCard();
  card.querySelector(".settings").textContent = summary(request);
  setProgress(card, 0, "sending");
  card.querySelector(".stop").addEventListener("click", () =>
    fetch(`sdapi/v1/interrupt?task_id=${encodeURIComponent(taskId)}`, { method: "POST" }));
  let done = false;
  const polling = poll(card, taskId, () => done);
  try {
    const result = await api("sdapi/v1/txt2img", request);
    done = true;
    showResult(card, request, result);
  } catch (e) {
    done = true;
    card.remove();
    showError(e.message);
    $("empty").hidden = $("gallery").children.length > 0;
  }
  await polling;
}

$("form").addEventListener("submit", generate);
$("random-seed").addEventListener("click", () => { $("seed").value = -1; });
$("model").addEventListener("change", async () => {
  const title = $("model").value;
  $("status").textContent = `loading ${title}`;
  try {
    await api("sdapi/v1/options", { sd_model_checkpoint: title });
    applyDefaults((await api("sdapi/v1/options")).ldm_defaults || {});
    $("status").textContent = `${title} loaded`;
  } catch (e) {
    showError(e.message);
  }
});
init().catch((e) => showError(`could not reach the server: ${e.message}`));
