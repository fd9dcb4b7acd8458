// The latentdiff page: calls the JSON API of the server that served it. No libraries, works offline.
"use strict";
const $ = (id) => document.getElementById(id);
const URL_KEYS = ["labels", "per_label", "guidance_scale", "steps", "sampler", "seed"];
let info = null;

async function api(path, body) {
  const t0 = performance.now();
  const res = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  data.roundTrip = (performance.now() - t0) / 1000;
  return data;
}

function showError(id, err) {
  const box = $(id);
  box.hidden = !err;
  box.textContent = err ? String(err.message || err) : "";
}

async function busy(button, fn) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "Working…";
  try { await fn(); } finally { button.disabled = false; button.textContent = label; }
}

// ---------------------------------------------------------------- sampling settings (shared)
function sampling() {
  const s = {guidance_scale: Number($("guidance-num").value), steps: Number($("steps").value), sampler: $("sampler").value};
  if ($("seed").value !== "") s.seed = Number($("seed").value);
  return s;
}

function setGuidance(v) { $("guidance").value = v; $("guidance-num").value = v; }

function timing(r, n) {
  const seed = r.settings.seed === undefined ? "" : ` · seed ${r.settings.seed}`;
  return `${n} digit${n === 1 ? "" : "s"} in ${r.seconds.toFixed(2)} s on the model ` +
         `(${r.roundTrip.toFixed(2)} s round trip)${seed}`;
}

function scaleImage(img, scale) {
  img.onload = () => { img.style.width = `${img.naturalWidth * scale}px`; };
}

// ---------------------------------------------------------------- generate
function chosenClasses() {
  return [...document.querySelectorAll("#classes input:checked")].map((el) => Number(el.value));
}

async function generate() {
  showError("gen-error", null);
  const labels = chosenClasses();
  if (!labels.length) { showError("gen-error", "choose at least one digit"); return; }
  const body = {labels, per_label: Number($("per-label").value), ...sampling()};
  let r;
  try { r = await api("/api/generate", body); } catch (e) { showError("gen-error", e); return; }
  const img = $("grid");
  scaleImage(img, Math.max(1, Math.min(4, Math.floor(560 / (r.columns * 30)))));
  img.src = r.image;
  $("gen-time").textContent = timing(r, r.count);
  $("download").href = r.image;
  $("download").download = `latentdiff_${r.settings.labels.join("")}_seed${r.settings.seed}.png`;
  const query = new URLSearchParams();
  for (const k of URL_KEYS) if (r.settings[k] !== undefined) query.set(k, [].concat(r.settings[k]).join(","));
  history.replaceState(null, "", `?${query}`);  // this URL reproduces the grid exactly
  $("share-url").value = location.href;
  $("gen-result").hidden = false;
}

async function copyLink() {
  try { await navigator.clipboard.writeText(location.href); } catch (e) { $("share-url").select(); document.execCommand("copy"); }
  $("copied").hidden = false;
  setTimeout(() => { $("copied").hidden = true; }, 1500);
}

function applyQuery() {
  const q = new URLSearchParams(location.search);
  if (!q.has("labels")) return false;
  const wanted = new Set(q.get("labels").split(",").map(Number));
  document.querySelectorAll("#classes input").forEach((el) => { el.checked = wanted.has(Number(el.value)); });
  if (q.has("per_label")) $("per-label").value = q.get("per_label");
  if (q.has("guidance_scale")) setGuidance(q.get("guidance_scale"));
  if (q.has("steps")) $("steps").value = q.get("steps");
  if (q.has("sampler")) $("sampler").value = q.get("sampler");
  if (q.has("seed")) $("seed").value = q.get("seed");
  return true;
}

// ---------------------------------------------------------------- drawing canvases
const draw = $("draw"), mask = $("mask");
const dctx = draw.getContext("2d"), mctx = mask.getContext("2d");
let maskPainted = false;

function blank(ctx) { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, ctx.canvas.width, ctx.canvas.height); }
function clearDrawing() { blank(dctx); }
function clearMask() { mctx.clearRect(0, 0, mask.width, mask.height); maskPainted = false; }

function line(ctx, colour, width, from, to) {
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(...from); ctx.lineTo(...to); ctx.stroke();
}

function onStrokes(surface, stroke) {
  // Pointer events cover mouse, pen and touch alike; stroke(from, to) gets the surface's pixel coordinates.
  let last = null;
  const point = (e) => {
    const r = surface.getBoundingClientRect();
    return [(e.clientX - r.left) * surface.width / r.width, (e.clientY - r.top) * surface.height / r.height];
  };
  surface.addEventListener("pointerdown", (e) => {
    surface.setPointerCapture(e.pointerId); last = point(e); stroke(last, last); e.preventDefault();
  });
  surface.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(last, p); last = p; } });
  const end = () => { last = null; };
  surface.addEventListener("pointerup", end);
  surface.addEventListener("pointercancel", end);
}

function setupCanvas() {
  clearDrawing();
  const tool = () => document.querySelector("input[name=tool]:checked").value;
  onStrokes(mask, (from, to) => {  // the overlay (mask) canvas is on top and takes the events
    const t = tool();
    line(t === "mask" ? mctx : dctx, t === "pen" ? "#fff" : t === "mask" ? "#e5484d" : "#000", Number($("brush").value), from, to);
    if (t === "mask") maskPainted = true;
  });
}

function keepMask() {
  // The API's mask is white = keep, black = fill; the brush paints what to fill.
  const out = document.createElement("canvas");
  out.width = mask.width; out.height = mask.height;
  const src = mctx.getImageData(0, 0, mask.width, mask.height), ctx = out.getContext("2d");
  const dst = ctx.createImageData(mask.width, mask.height);
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 0 ? 0 : 255;
    dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v; dst.data[i + 3] = 255;
  }
  ctx.putImageData(dst, 0, 0);
  return out.toDataURL("image/png");
}

function editBody(kind) {
  const image = draw.toDataURL("image/png");
  if (kind === "every_class") {  // deterministic (DDIM inversion): no seed, no sampler; label = what was drawn
    const body = {image, steps: Number($("steps").value)};  // its own guidance and strength (edit.swap_class's)
    if ($("drawn").value !== "") body.label = Number($("drawn").value);
    return body;
  }
  const body = {image, label: Number($("target").value), count: Number($("count").value), ...sampling()};
  if (kind === "img2img") body.strength = Number($("strength").value);
  else body.mask = keepMask();
  return body;
}

const EDIT_DONE = {img2img: (r) => `redrawn as ${r.settings.label}`, inpaint: (r) => `filled as ${r.settings.label}`,
                   every_class: () => "your hand in every class"};

async function edit(kind) {
  showError("edit-error", null);
  if (kind === "inpaint" && !maskPainted) { showError("edit-error", "paint the area to fill with the Mask brush first"); return; }
  const body = editBody(kind);
  let r;
  try { r = await api(`/api/${kind}`, body); } catch (e) { showError("edit-error", e); return; }
  scaleImage($("edit-input"), 3);
  scaleImage($("edit-output"), r.count > 4 ? 2 : 3);
  $("edit-input").src = r.input;
  $("edit-output").src = r.image;
  $("edit-time").textContent = `${EDIT_DONE[kind](r)}: ` + timing(r, r.count);
  $("edit-result").hidden = false;
}

// ---------------------------------------------------------------- teaching a new symbol
const teachCanvas = $("teach-draw"), tctx = teachCanvas.getContext("2d");
const TEACH_BRUSH = 22;  // the drawing canvas's default brush: MNIST-like strokes at 28x28
const examples = [];  // PNG data URLs of the drawings added

function showExamples() {
  const min = info.teach.min_images || 2;
  $("teach-count").textContent = `${examples.length} example${examples.length === 1 ? "" : "s"} ` +
    `(at least ${min}; 5-10 work well)`;
  $("teach-examples").replaceChildren(...examples.map((src, i) => {
    const b = document.createElement("button"), img = document.createElement("img");
    b.type = "button"; b.title = "remove this example";
    img.src = src; img.alt = `example ${i + 1}`;
    b.append(img);
    b.onclick = () => { examples.splice(i, 1); showExamples(); };
    return b;
  }));
  $("teach-remove-all").hidden = !examples.length;
}

function addExample() {
  showError("teach-error", null);
  const px = tctx.getImageData(0, 0, teachCanvas.width, teachCanvas.height).data;
  if (!px.some((v, i) => i % 4 === 0 && v > 0)) { showError("teach-error", "draw the symbol on the canvas first"); return; }
  examples.push(teachCanvas.toDataURL("image/png"));
  blank(tctx);
  showExamples();
}

function showJob(job) {
  const bar = $("teach-progress"), status = $("teach-status");
  bar.hidden = job.status !== "running";
  bar.value = job.step / job.steps;
  status.hidden = false;
  status.textContent = job.status === "done"
    ? `taught "${job.name}" as class ${job.label} from ${job.examples} examples in ${job.seconds.toFixed(1)} s: ` +
      "selected under Generate"
    : job.step ? `teaching "${job.name}": step ${job.step} of ${job.steps} · ${job.seconds.toFixed(0)} s`
      : `teaching "${job.name}": preparing (the model draws digits to keep) · ${job.seconds.toFixed(0)} s`;
}

async function teachSymbol() {
  showError("teach-error", null);
  const body = {name: $("teach-name").value.trim(), images: examples, steps: Number($("teach-steps").value)};
  if (!body.name) { showError("teach-error", "give the new symbol a name"); return; }
  try {
    let job = await api("/api/teach", body);
    while (job.status === "running") {  // the server teaches in the background; ask how far it got
      showJob(job);
      await new Promise((done) => setTimeout(done, 500));
      job = await api(job.url);
    }
    if (job.status === "failed") throw new Error(job.error);
    info = await api("/api/info");
    showClasses([job.label]);  // the new class alone is selected: Generate draws it
    examples.length = 0;
    showExamples();
    $("teach-name").value = "";
    showJob(job);
  } catch (e) {
    $("teach-progress").hidden = $("teach-status").hidden = true;
    showError("teach-error", e);
  }
}

function setupTeaching() {
  blank(tctx);
  onStrokes(teachCanvas, (from, to) => line(tctx, "#fff", TEACH_BRUSH, from, to));
  showExamples();
  $("teach-add").onclick = addExample;
  $("teach-clear-draw").onclick = () => blank(tctx);
  $("teach-remove-all").onclick = () => { examples.length = 0; showExamples(); };
  $("teach-steps").value = info.teach.default_steps || "";
  $("teach-steps").max = info.limits.max_teach_steps;
  if (!info.teach.enabled) {
    $("teach").disabled = $("teach-add").disabled = true;
    $("teach").title = `this server does not teach: ${info.teach.reason}`;
    showError("teach-error", $("teach").title);
    return;
  }
  $("teach").onclick = () => busy($("teach"), teachSymbol);
}

// ---------------------------------------------------------------- start
function option(value, text) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text;
  return o;
}

function showClasses(checked) {
  // Class names come from the server and may be taught by anyone: text nodes only, never HTML.
  const names = info.class_names;
  $("classes").replaceChildren(...names.map((name, c) => {
    const label = document.createElement("label"), box = document.createElement("input"), span = document.createElement("span");
    box.type = "checkbox"; box.value = c; box.checked = checked === undefined || checked.includes(c);
    span.textContent = name;
    label.append(box, span);
    return label;
  }));
  const target = $("target").value;
  $("target").replaceChildren(...names.map((name, c) => option(c, name)));
  if (target) $("target").value = target;
  const drawn = $("drawn").value;
  $("drawn").replaceChildren(option("", "?"), ...names.map((name, c) => option(c, name)));
  $("drawn").value = drawn;
  $("model-info").textContent = `${info.model} · ${info.device} · ${names.length} classes`;
}

async function start() {
  try { info = await api("/api/info"); } catch (e) { showError("gen-error", `cannot reach the server: ${e.message}`); return; }
  const d = info.defaults;
  showClasses();
  $("sampler").innerHTML = info.samplers.map((s) => `<option>${s}</option>`).join("");
  $("sampler").value = d.sampler;
  $("steps").value = d.steps; $("steps").max = info.limits.max_steps;
  $("seed").max = info.limits.max_seed;
  setGuidance(d.guidance_scale);
  $("per-label").max = $("count").max = info.limits.max_images;
  for (const kind of ["img2img", "inpaint", "every_class"]) {
    if (!info.edits.includes(kind)) { $(kind).disabled = true; $(kind).title = "this server has no " + kind; }
  }
  $("guidance").oninput = () => { $("guidance-num").value = $("guidance").value; };
  $("guidance-num").oninput = () => { $("guidance").value = $("guidance-num").value; };
  $("seed-random").onclick = () => { $("seed").value = ""; };
  $("all").onclick = () => document.querySelectorAll("#classes input").forEach((el) => { el.checked = true; });
  $("none").onclick = () => document.querySelectorAll("#classes input").forEach((el) => { el.checked = false; });
  $("generate").onclick = () => busy($("generate"), generate);
  $("copy-link").onclick = copyLink;
  $("strength").oninput = () => { $("strength-out").value = Number($("strength").value).toFixed(2); };
  $("strength").value = d.strength;
  $("strength").oninput();
  $("clear-draw").onclick = clearDrawing;
  $("clear-mask").onclick = clearMask;
  $("img2img").onclick = () => busy($("img2img"), () => edit("img2img"));
  $("inpaint").onclick = () => busy($("inpaint"), () => edit("inpaint"));
  $("every_class").onclick = () => busy($("every_class"), () => edit("every_class"));
  setupCanvas();
  setupTeaching();
  if (applyQuery()) busy($("generate"), generate);  // a shared link shows its grid straight away
}
start();
