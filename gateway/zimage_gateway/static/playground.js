// The playground: one POST /v1/images/generations per click (/v1/images/edits, a multipart form,
// when an image to edit is chosen), each image added to the gallery with its seed and timings.
// The key stays in this tab (sessionStorage), never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);

function optionalInt(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function caption(entry, roundTripMs) {
  const timings = entry.timings_ms || {};
  const stages = Object.entries(timings)
    .map(([stage, ms]) => `${stage} ${Number(ms).toFixed(1)} ms`)
    .join(", ");
  return `seed ${entry.seed}\nround trip ${roundTripMs.toFixed(0)} ms\n${stages}`;
}

function show(entry, format, size, prompt, roundTripMs) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = prompt;
  img.src = `data:image/${format};base64,${entry.b64_json}`;
  img.dataset.seed = String(entry.seed);
  const text = document.createElement("figcaption");
  text.textContent = `${size}\n${caption(entry, roundTripMs)}`;
  figure.append(img, text);
  $("gallery").prepend(figure);
}

async function generate(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  sessionStorage.setItem("zimage-api-key", key);
  const body = {
    prompt: $("prompt").value,
    size: $("size").value,
    n: optionalInt("n"),
    num_inference_steps: optionalInt("steps"),
    seed: optionalInt("seed"),
    response_format: "b64_json",
  };
  const status = $("status");
  status.className = "";
  status.textContent = "generating...";
  $("generate").disabled = true;
  const started = performance.now();
  try {
    const headers = {};
    if (key) headers.authorization = `Bearer ${key}`;
    const file = $("image").files[0];
    let response;
    if (file) {
      // The browser sets the multipart boundary itself: no content-type header here.
      const form = new FormData();
      form.append("image", file);
      body.strength = $("strength").value.trim() === "" ? undefined : $("strength").value.trim();
      for (const [name, value] of Object.entries(body)) {
        if (value !== undefined) form.append(name, String(value));
      }
      response = await fetch("v1/images/edits", { method: "POST", headers, body: form });
    } else {
      headers["content-type"] = "application/json";
      response = await fetch("v1/images/generations", { method: "POST", headers, body: JSON.stringify(body) });
    }
    const answer = await response.json();
    if (!response.ok) {
      throw new Error(answer.error ? answer.error.message : `HTTP ${response.status}`);
    }
    const roundTripMs = performance.now() - started;
    for (const entry of answer.data) show(entry, answer.output_format, answer.size, body.prompt, roundTripMs);
    status.textContent = `${answer.data.length} image(s) in ${roundTripMs.toFixed(0)} ms`;
  } catch (error) {
    status.className = "error";
    status.textContent = String(error.message || error);
  } finally {
    $("generate").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("zimage-api-key") || "";
  $("form").addEventListener("submit", generate);
});
