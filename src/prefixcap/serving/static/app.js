// The prefixcap page: each chosen or dropped image becomes a card, sent to /v1/caption on its
// own so that captions appear as they arrive (the server batches concurrent requests anyway).
"use strict";

const optionsForm = document.getElementById("options");
const dropZone = document.getElementById("drop-zone");
const fileInput = document.getElementById("file-input");
const results = document.getElementById("results");
const cardTemplate = document.getElementById("card-template");

// Decoding options as form fields, with the names of Hugging Face `generate`.
function decodingOptions() {
  const form = new FormData(optionsForm);
  const mode = form.get("mode");
  const options = {};
  if (mode === "beam") {
    options.num_beams = form.get("num_beams");
  } else if (mode === "sample") {
    options.do_sample = "true";
    options.temperature = form.get("temperature");
    options.top_p = form.get("top_p");
  }
  if (mode !== "greedy") options.num_return_sequences = form.get("num_return_sequences");
  if (form.get("max_new_tokens")) options.max_new_tokens = form.get("max_new_tokens");
  return options;
}

// Show only the fields that apply to the chosen decoding mode.
function showModeFields() {
  const mode = new FormData(optionsForm).get("mode");
  for (const label of optionsForm.querySelectorAll("[data-mode]")) {
    label.hidden = !label.dataset.mode.split(" ").includes(mode);
  }
}

function addCard(file) {
  const card = cardTemplate.content.firstElementChild.cloneNode(true);
  const image = card.querySelector("img");
  image.addEventListener("error", () => image.replaceWith(noPreview())); // the browser cannot show it
  image.src = URL.createObjectURL(file);
  card.querySelector(".file-name").textContent = file.name;
  results.append(card);
  return card;
}

function noPreview() {
  const frame = document.createElement("div");
  frame.className = "no-preview";
  frame.textContent = "no preview";
  return frame;
}

function showCaptions(card, captions) {
  const list = card.querySelector(".captions");
  for (const { generated_text: text } of captions) {
    const item = document.createElement("li");
    item.className = "caption";
    item.textContent = text || "(empty caption)";
    list.append(item);
  }
  card.querySelector(".message").remove();
  card.classList.replace("pending", "done");
}

function showError(card, message) {
  card.querySelector(".message").textContent = message;
  card.classList.replace("pending", "failed");
}

async function caption(file) {
  const card = addCard(file);
  const body = new FormData();
  body.append("images", file, file.name);
  for (const [name, value] of Object.entries(decodingOptions())) body.append(name, value);
  try {
    const response = await fetch("/v1/caption", { method: "POST", body });
    const answer = await response.json().catch(() => null);
    if (response.ok) {
      showCaptions(card, answer[0]);
    } else {
      showError(card, answer?.error?.message ?? `error ${response.status}`);
    }
  } catch (error) {
    showError(card, `the server did not answer (${error.message})`);
  }
}

function captionAll(files) {
  for (const file of files) caption(file);
}

async function showModel() {
  const status = document.getElementById("model-status");
  try {
    const health = await (await fetch("/health")).json();
    status.textContent = `${health.model} on ${health.device}` + (health.ready ? "" : " (not ready)");
  } catch {
    status.textContent = "server unreachable";
  }
}

optionsForm.addEventListener("change", showModeFields);
fileInput.addEventListener("change", () => {
  captionAll(fileInput.files);
  fileInput.value = ""; // choosing the same file again should caption it again
});
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  captionAll(event.dataTransfer.files);
});

// `prefixcap serve --web DIR` also offers a page that captions in the browser: link to it
async function offerWebExport() {
  const answer = await fetch("/web/prefixcap_web.json", { method: "HEAD" }).catch(() => null);
  document.getElementById("web-link").hidden = !answer?.ok;
}

showModeFields();
showModel();
offerWebExport();
