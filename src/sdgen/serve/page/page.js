// sdgen's page: plain JavaScript over the same A1111 API every other client uses (no build step).
"use strict";
const $ = (id) => document.getElementById(id);
let running = false;

async function api(path, body) {
  const init = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : `${r.status} ${r.statusText}`);
  return data;
}

async function start() {
  const [samplers, options] = await Promise.all([api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
  for (const s of samplers) $("sampler").add(new Option(s.name, s.name));
  $("sampler").value = "Euler";
  $("model").textContent = options.sd_model_checkpoint;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("status").className = "";
  $("status").textContent = "Queued...";
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: number("steps"), cfg_scale: number("cfg"), seed: number("seed"), width: number("width"),
    height: number("height"), batch_size: number("batch"),
  };
  const poll = setInterval(showProgress, 300);
  try {
    const result = await api("/sdapi/v1/txt2img", body);
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addImage(b64, info.infotexts[i], info.all_seeds[i]));
    $("status").textContent = `Done: seed ${info.seed}` + (info.interrupted ? " (interrupted)" : "");
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = e.message;
  } finally {
    clearInterval(poll);
    running = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("bar").value = 0;
    $("preview").hidden = true;
  }
}

async function showProgress() {
  let p;
  try { p = await api("/sdapi/v1/progress"); } catch (e) { return; }
  if (!running) return;
  $("bar").value = p.progress;
  if (p.textinfo) $("status").textContent = p.textinfo + (p.eta_relative ? `, about ${p.eta_relative.toFixed(1)} s left` : "");
  if (p.current_image) {
    $("preview").src = "data:image/png;base64," + p.current_image;
    $("preview").hidden = false;
  }
}

function addImage(b64, text, seed) {
  const url = "data:image/png;base64," + b64;
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = text;
  const caption = document.createElement("figcaption");
  caption.textContent = text;
  const link = document.createElement("a");
  link.href = url;
  link.download = `sdgen-${seed}.png`;
  link.textContent = "Download";
  figure.dataset.seed = seed;
  figure.append(img, caption, link);
  $("gallery").prepend(figure);
}

async function readPng(file) {
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  try {
    const r = await api("/sdapi/v1/png-info", { image: data });
    $("pnginfo").className = "";
    $("pnginfo").textContent = r.info || "This image holds no generation parameters.";
    const p = r.parameters;
    if (p.Prompt !== undefined) {
      $("prompt").value = p.Prompt;
      $("negative").value = p["Negative prompt"] || "";
      for (const [id, key] of [["steps", "Steps"], ["cfg", "CFG scale"], ["seed", "Seed"], ["width", "Size-1"], ["height", "Size-2"]])
        if (p[key] !== undefined) $(id).value = p[key];
      if (p.Sampler) $("sampler").value = p.Sampler;
    }
  } catch (e) {
    $("pnginfo").className = "error";
    $("pnginfo").textContent = e.message;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  if (e.dataTransfer.files.length) readPng(e.dataTransfer.files[0]);
});
start().catch((e) => { $("status").className = "error"; $("status").textContent = e.message; });
