// lorakit serve playground: pick models (the base and adapters), send one prompt to each, watch the answers
// stream side by side. Plain JS, no build step; talks to the same OpenAI-compatible API as any client.
"use strict";

const $ = (id) => document.getElementById(id);
let running = [];  // AbortControllers of the answers in progress

function apiKey() {
  return sessionStorage.getItem("lorakit-api-key") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const box = $("models");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    box.textContent = "";
    showError("Could not list the models: " + (await errorMessage(response)) +
              (response.status === 401 ? " (enter the API key below)" : ""));
    if (response.status === 401) $("key-box").open = true;
    return;
  }
  showError("");
  const models = (await response.json()).data;
  box.textContent = "";
  models.forEach((model, i) => {
    const label = document.createElement("label");
    label.className = "model-choice";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = model.id;
    input.dataset.model = model.id;
    input.checked = i < 2;  // the base model and the first adapter
    const name = document.createElement("span");
    name.textContent = model.id;
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = model.parent ? "adapter" : "base model";
    label.append(input, name, tag);
    box.append(label);
  });
}

function selectedModels() {
  return Array.from(document.querySelectorAll("#models input:checked")).map((input) => input.value);
}

function answerColumn(model) {
  const column = document.createElement("article");
  column.className = "answer";
  column.dataset.model = model;
  const title = document.createElement("h2");
  title.textContent = model;
  const text = document.createElement("pre");
  text.className = "text";
  const status = document.createElement("div");
  status.className = "status";
  status.dataset.state = "streaming";
  status.textContent = "waiting...";
  column.append(title, text, status);
  return column;
}

// Reads a server-sent event stream; calls onEvent with each parsed JSON `data:` payload until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function ask(model, messages, options, column) {
  const text = column.querySelector(".text");
  const status = column.querySelector(".status");
  const controller = new AbortController();
  running.push(controller);
  const started = performance.now();
  let firstToken = null;
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...options }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    status.textContent = "streaming...";
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstToken === null) firstToken = performance.now();
          text.textContent += piece;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const ttft = firstToken === null ? "-" : ((firstToken - started) / 1000).toFixed(2) + " s";
    const tokens = usage ? usage.completion_tokens + " tokens, " : "";
    status.textContent = `done (${finish}): ${tokens}${seconds} s, first token after ${ttft}`;
    status.dataset.state = "done";
  } catch (err) {
    status.dataset.state = controller.signal.aborted ? "stopped" : "error";
    status.textContent = controller.signal.aborted ? "stopped" : "error: " + err.message;
  }
}

async function send() {
  const models = selectedModels();
  const prompt = $("prompt").value.trim();
  if (!models.length) return showError("Pick at least one model.");
  if (!prompt) return showError("Write a prompt first.");
  showError("");
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  messages.push({ role: "user", content: prompt });
  const options = {
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    temperature: parseFloat($("temperature").value) || 0,
    top_p: parseFloat($("top-p").value) || 1,
  };
  const results = $("results");
  results.textContent = "";
  const columns = models.map((model) => results.appendChild(answerColumn(model)));
  $("send").disabled = true;
  $("stop").disabled = false;
  await Promise.all(models.map((model, i) => ask(model, messages, options, columns[i])));
  running = [];
  $("send").disabled = false;
  $("stop").disabled = true;
}

function stop() {
  running.forEach((controller) => controller.abort());
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("lorakit-api-key", $("api-key").value.trim());
    loadModels();
  });
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send();
  });
  try {
    const health = await (await fetch("/health")).json();
    $("server-info").textContent = `base model: ${health.model}`;
  } catch (e) { /* the model list below reports problems */ }
  await loadModels();
  document.body.dataset.ready = "true";
}

start();
