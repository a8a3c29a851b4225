"use strict";
// cnnscope page: every list (methods, their options, models, labels) comes from the API.
const $ = (id) => document.getElementById(id);
const state = { file: null, sample: null, methods: [], labels: [], target: null, objectUrl: null, image: 0, request: 0 };

function message(text) { $("message").textContent = text || ""; }

async function api(path, form) {
  const response = await fetch(path, form ? { method: "POST", body: form } : {});
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `request failed (${response.status})`);
  return body;
}

function imageForm() {
  const form = new FormData();
  if (state.file) form.append("image", state.file);
  else if (state.sample) form.append("sample", state.sample);
  form.append("model", $("model").value);
  form.append("multilabel", $("multilabel").checked ? "true" : "false");
  return form;
}

function methodOptions(name) {
  const values = {};
  document.querySelectorAll(`#options [data-method="${name}"]`).forEach((input) => {
    const key = input.dataset.option;
    if (input.type === "checkbox") values[key] = input.checked;
    else if (input.value === "") return;
    else if (input.dataset.kind === "int" || input.dataset.kind === "float") values[key] = Number(input.value);
    else if (input.dataset.kind === "object") {
      try { values[key] = JSON.parse(input.value); } catch (e) { values[key] = input.value; }
    } else values[key] = input.value;
  });
  return values;
}

// The form follows each option's declaration (GET /api/methods): a checkbox for true/false, a number
// field with the declared range, a list for a choice, JSON text for anything else.
function optionInput(spec) {
  let input;
  if (spec.type === "bool") {
    input = document.createElement("input");
    input.type = "checkbox"; input.checked = spec.default === true;
  } else if (spec.type === "choice") {
    input = document.createElement("select");
    const choices = spec.optional ? ["", ...spec.choices] : spec.choices;
    for (const choice of choices) {
      const option = document.createElement("option");
      option.value = choice; option.textContent = choice === "" ? "(automatic)" : choice;
      input.append(option);
    }
    input.value = spec.default === null ? "" : spec.default;
  } else if (spec.type === "int" || spec.type === "float") {
    input = document.createElement("input");
    input.type = "number"; input.step = spec.type === "int" ? "1" : "any";
    if (spec.low !== undefined) input.min = spec.low;
    if (spec.high !== undefined) input.max = spec.high;
    input.value = spec.default === null ? "" : spec.default;
    if (spec.default === null) input.placeholder = "auto";
  } else {
    input = document.createElement("input");
    input.type = "text"; input.value = spec.default === null ? "" : JSON.stringify(spec.default);
  }
  input.dataset.kind = spec.type;
  input.title = `${spec.help} (${spec.range})`;
  return input;
}

function renderOptions() {
  const name = $("method").value;
  const method = state.methods.find((m) => m.name === name);
  const box = $("options");
  box.innerHTML = "";
  if (!method) return;
  for (const [key, spec] of Object.entries(method.options)) {
    if (key === "quiet" || !spec.web) continue;
    const label = document.createElement("label");
    const input = optionInput(spec);
    input.dataset.method = name; input.dataset.option = key;
    label.title = input.title;
    label.append(`${key} `, input);
    box.append(label);
  }
}

async function predict() {
  const image = state.image;
  const body = await api("/api/predict", imageForm());
  if (image !== state.image) return null;  // another image was chosen meanwhile: drop this answer
  const list = $("top5");
  list.innerHTML = "";
  body.predictions.forEach((p) => {
    const item = document.createElement("li");
    item.dataset.classIndex = p.class_index;
    item.textContent = `${p.class_name} ${(100 * p.probability).toFixed(1)}%`;
    const bar = document.createElement("div");
    bar.className = "bar"; bar.style.width = `${Math.max(1, 100 * p.probability)}%`;
    item.append(bar);
    item.addEventListener("click", () => explain(String(p.class_index)));
    list.append(item);
  });
  return body.predictions;
}

async function explainWith(method, target, overlay = false) {
  const form = imageForm();
  form.append("raw", "false");  // the page shows the heatmap; the raw values are for API clients
  if (overlay) form.append("overlay", "true");
  form.append("method", method);
  form.append("target", target);
  form.append("options", JSON.stringify(methodOptions(method)));
  if ($("colormap").value) form.append("colormap", $("colormap").value);
  return api("/api/explain", form);
}

async function explain(target) {
  if (!state.file && !state.sample) { message("choose an image first"); return; }
  state.target = target;
  const request = ++state.request;
  message("explaining…");
  try {
    const body = await explainWith($("method").value, target);
    if (request !== state.request) return;  // a newer request (image, class, method) replaced this one
    const map = body.maps[0];
    $("heat").src = `data:image/png;base64,${map.heatmap_png}`;
    $("heat").style.opacity = $("opacity").value;
    $("caption").textContent = `${body.method}${body.layer ? " @ " + body.layer : ""} · ${map.class_name} ` +
      `(${(100 * map.probability).toFixed(1)}%) · peak at (${map.peak.join(", ")})`;
    $("caption").dataset.className = map.class_name;
    $("notes").textContent = (body.notes || []).join(" ");
    document.querySelectorAll("#top5 li").forEach((li) =>
      li.classList.toggle("active", li.dataset.classIndex === String(map.class_index)));
    $("download").disabled = false;
    message("");
  } catch (error) { if (request === state.request) message(error.message); }
}

async function compare() {
  const chosen = [...document.querySelectorAll("#compareMethods input:checked")].map((c) => c.value);
  if (!chosen.length) { message("tick the methods to compare"); return; }
  const panels = $("panels");
  panels.innerHTML = "";
  for (const method of chosen) {
    try {
      const body = await explainWith(method, state.target || "top1", true);
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${body.maps[0].overlay_png}`;
      figure.append(img, `${method} · ${body.maps[0].class_name}`);
      panels.append(figure);
    } catch (error) { message(`${method}: ${error.message}`); }
  }
}

async function useImage(file, sample) {
  state.file = file; state.sample = sample; state.image += 1; state.request += 1;  // answers for the old image are dropped
  const image = state.image;
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = file ? URL.createObjectURL(file) : null;
  $("photo").src = file ? state.objectUrl : `/api/samples/${sample}`;
  $("heat").removeAttribute("src");
  message("classifying…");
  try {
    const predictions = await predict();
    if (predictions) await explain(String(predictions[0].class_index));
  } catch (error) { if (image === state.image) message(error.message); }
}

function download() {
  const photo = $("photo"), heat = $("heat");
  const canvas = document.createElement("canvas");
  canvas.width = photo.naturalWidth; canvas.height = photo.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(photo, 0, 0);
  context.globalAlpha = Number($("opacity").value);
  context.drawImage(heat, 0, 0, canvas.width, canvas.height);
  canvas.toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `cnnscope-${$("method").value}-${$("caption").dataset.className || "map"}.png`;
    link.click();
  }, "image/png");
}

async function start() {
  const [models, methods] = await Promise.all([api("/api/models"), api("/api/methods")]);
  state.methods = methods;
  for (const name of models.models) $("model").append(new Option(name, name, false, name === models.default));
  for (const name of models.samples) $("sample").append(new Option(name, name));
  for (const name of models.colormaps) $("colormap").append(new Option(name, name));
  for (const method of methods) {
    $("method").append(new Option(method.name, method.name, false, method.name === "gradcam"));
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.value = method.name;
    box.checked = ["gradcam", "gradcam++", "saliency"].includes(method.name);
    label.append(box, ` ${method.name}`);
    $("compareMethods").append(label);
  }
  renderOptions();
  $("method").addEventListener("change", () => { renderOptions(); if (state.target) explain(state.target); });
  $("model").addEventListener("change", async () => { await loadLabels(); if (state.file || state.sample) useImage(state.file, state.sample); });
  $("sample").addEventListener("change", (e) => { if (e.target.value) useImage(null, e.target.value); });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) useImage(e.target.files[0], null); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) useImage(e.dataTransfer.files[0], null); });
  $("opacity").addEventListener("input", (e) => { $("heat").style.opacity = e.target.value; });
  $("colormap").addEventListener("change", () => { if (state.target) explain(state.target); });
  $("multilabel").addEventListener("change", () => { if (state.file || state.sample) useImage(state.file, state.sample); });
  $("explainClass").addEventListener("click", () => {
    const name = $("classSearch").value.trim();
    if (!name) { message("type a class name"); return; }
    const index = state.labels.findIndex((label) => label.toLowerCase() === name.toLowerCase());
    explain(index >= 0 ? String(index) : name);
  });
  $("compare").addEventListener("click", compare);
  $("download").addEventListener("click", download);
  await loadLabels();
  document.body.dataset.ready = "true";  // every control is wired (tests wait for this)
}

async function loadLabels() {
  const body = await api(`/api/labels?model=${encodeURIComponent($("model").value)}`);
  state.labels = body.labels;
  const list = $("labels");
  list.innerHTML = "";
  body.labels.forEach((label) => list.append(new Option(label)));
}

start().catch((error) => message(error.message));
