// The page of a web export: load the model once, then caption dropped or chosen images one after
// another, each card filling in as its caption is made. Everything runs here; after the model has
// loaded the page makes no request. `?backend=wasm|webgpu` and `?threads=N` override the defaults.
import { Captioner } from "./captioner.js";

const status = document.getElementById("model-status");
const loadProgress = document.getElementById("load-progress");
const optionsForm = document.getElementById("options");
const dropZone = document.getElementById("drop-zone");
const fileInput = document.getElementById("file-input");
const queueStatus = document.getElementById("queue-status");
const queueProgress = document.getElementById("queue-progress");
const results = document.getElementById("results");
const cardTemplate = document.getElementById("card-template");

const queue = [];
let captioner = null;
let running = false;
let captioned = 0;
let added = 0;

const megabytes = (bytes) => (bytes / 1e6).toFixed(1);

async function load() {
  const params = new URLSearchParams(location.search);
  const threads = params.has("threads") ? Number(params.get("threads")) : undefined; // checked by load
  try {
    captioner = await Captioner.load("./", {
      backend: params.get("backend") || "auto",
      threads,
      onProgress: ({ loaded, total }) => {
        loadProgress.value = loaded / total;
        status.textContent = `loading the model: ${megabytes(loaded)} of ${megabytes(total)} MB`;
      },
    });
  } catch (error) {
    status.textContent = `cannot load the model: ${error.message}`;
    status.classList.add("error");
    return;
  }
  const { backend, threads: used, precision, ort } = captioner.info;
  const where = backend === "webgpu" ? "WebGPU" : `WASM, ${used} thread${used === 1 ? "" : "s"}`;
  status.textContent = `ready: ${captioner.manifest.name} (${precision}) on ${where}, onnxruntime-web ${ort}`;
  loadProgress.hidden = true;
  fileInput.disabled = false;
  globalThis.captioner = captioner; // for the console (and tests)
  document.body.dataset.ready = "true";
  const maxTokens = optionsForm.elements.maxNewTokens;
  maxTokens.placeholder = String(captioner.manifest.generation.max_new_tokens ?? "default");
  runQueue();
}

function decodingOptions() {
  const form = new FormData(optionsForm);
  const options = {};
  if (form.get("mode") === "beam") {
    options.numBeams = Number(form.get("numBeams"));
    options.numReturnSequences = Number(form.get("numReturnSequences"));
  } else {
    options.numBeams = 1;
  }
  if (form.get("maxNewTokens")) options.maxNewTokens = Number(form.get("maxNewTokens"));
  return options;
}

function showModeFields() {
  const mode = new FormData(optionsForm).get("mode");
  for (const label of optionsForm.querySelectorAll("[data-mode]")) label.hidden = label.dataset.mode !== mode;
}

function addFiles(files) {
  for (const file of files) {
    const card = cardTemplate.content.firstElementChild.cloneNode(true);
    card.querySelector(".file-name").textContent = file.name;
    results.append(card);
    drawPreview(file, card.querySelector("canvas"));
    queue.push({ file, card, options: decodingOptions() });
    added++;
  }
  updateProgress();
  runQueue();
}

async function drawPreview(file, canvas) {
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
    const [w, h] = [bitmap.width * scale, bitmap.height * scale];
    canvas.getContext("2d").drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    bitmap.close();
  } catch {
    const frame = document.createElement("div");
    frame.className = "no-preview";
    frame.textContent = "no preview";
    canvas.replaceWith(frame);
  }
}

async function runQueue() {
  if (running || !captioner) return;
  running = true;
  while (queue.length) {
    const { file, card, options } = queue.shift();
    card.querySelector(".message").textContent = "captioning…";
    const started = performance.now();
    try {
      const captions = await captioner.captions(file, options);
      const list = card.querySelector(".captions");
      for (const text of captions) {
        const item = document.createElement("li");
        item.className = "caption";
        item.textContent = text || "(empty caption)";
        list.append(item);
      }
      card.querySelector(".message").textContent = `${((performance.now() - started) / 1000).toFixed(2)} s`;
      card.classList.replace("pending", "done");
    } catch (error) {
      card.querySelector(".message").textContent = error.message;
      card.classList.replace("pending", "failed");
    }
    captioned++;
    updateProgress();
  }
  running = false;
}

function updateProgress() {
  queueProgress.hidden = added === 0;
  queueProgress.max = Math.max(added, 1);
  queueProgress.value = captioned;
  const waiting = captioner ? "" : " (waiting for the model)";
  queueStatus.textContent = added ? `${captioned} of ${added} images captioned${captioned < added ? waiting : ""}` : "";
}

optionsForm.addEventListener("change", showModeFields);
fileInput.addEventListener("change", () => {
  addFiles(fileInput.files);
  fileInput.value = "";
});
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  if (captioner) addFiles(event.dataTransfer.files);
});
showModeFields();
load();
