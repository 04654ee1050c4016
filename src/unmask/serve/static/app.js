// The unmask playground: sends prompts to the server's OpenAI-compatible API and animates the
// `diffusing` stream, one canvas frame per denoising step, masked positions resolving in place.
// Plain ES module, no dependencies: served as is by `unmask serve`.

const MASK_GLYPH = "░";
const MAX_STORED_FRAMES = 4000; // frames kept for the replay slider (a long answer can take thousands of steps)
const ENDPOINTS = { completion: "/v1/completions", chat: "/v1/chat/completions", fim: "/v1/fim/completions" };

const EXAMPLES = {
  completion: [
    { label: "fibonacci", prompt: "def fibonacci(n):\n" },
    { label: "a class", prompt: "class Stack:\n    def __init__(self):\n" },
    { label: "an HTML page", prompt: "<!DOCTYPE html>\n<html>\n<head>\n  <title>Snake</title>\n" },
  ],
  chat: [
    { label: "Snake", prompt: "Write Snake as one HTML file with a canvas, arrow keys and a reset button." },
    { label: "Minesweeper", prompt: "Write Minesweeper as one HTML file, with a timer and a banner when the game ends." },
    { label: "explain", prompt: "Explain in two sentences how a diffusion language model writes text." },
  ],
  fim: [
    { label: "function body", prefix: "def add(a, b):\n    ", suffix: "\n\nprint(add(1, 2))\n" },
    { label: "loop", prefix: "total = 0\nfor i in range(10):\n", suffix: "\nprint(total)\n" },
  ],
};

const RACE_MIN_CHARS = 8; // a lane that settles less text than this (after trimming spaces) "stopped at once": not ranked
const RACE_HINT_ONE_MODEL = "Serve a second model (unmask serve --ar-model DIR) to race diffusion against autoregression on the same prompt.";

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  model: $("#model"),
  apiKey: $("#api-key"),
  maxTokens: $("#max-tokens"),
  steps: $("#steps"),
  blockSize: $("#block-size"),
  policy: $("#policy"),
  threshold: $("#threshold"),
  factor: $("#factor"),
  temperature: $("#temperature"),
  seed: $("#seed"),
  playback: $("#playback"),
  race: $("#race"),
  raceModel: $("#race-model"),
  raceModelField: $("#race-model-field"),
  raceHint: $("#race-hint"),
  prompt: $("#prompt"),
  chatHistory: $("#chat-history"),
  chatSystem: $("#chat-system"),
  chatInput: $("#chat-input"),
  chatClear: $("#chat-clear"),
  fimPrefix: $("#fim-prefix"),
  fimSuffix: $("#fim-suffix"),
  examples: $("#examples"),
  run: $("#run"),
  stop: $("#stop"),
  error: $("#error"),
  lanes: $("#lanes"),
  preview: $("#preview"),
  previewFrame: $("#preview-frame"),
  previewClose: $("#preview-close"),
  theme: $("#theme"),
  laneTemplate: $("#lane-template"),
};

const state = {
  mode: "completion",
  models: [], // model objects from GET /v1/models
  chat: [], // finished turns: {role, content}
  controller: null, // AbortController of the run in progress
  runs: 0, // runs finished (successfully or not); mirrored in body[data-runs]
};

// ---------------------------------------------------------------------------- talking to the server

/** An error answered by the server, carrying the OpenAI error object's fields. */
class ApiError extends Error {
  constructor(status, error, retryAfter) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.code = error.code || null;
    this.param = error.param || null;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorFrom(response) {
  let error = { message: `${response.status} ${response.statusText}`.trim() };
  try {
    const body = await response.json();
    if (body && body.error) error = typeof body.error === "string" ? { message: body.error } : body.error;
    else if (body && body.detail) error = { message: typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail) };
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, error, response.headers.get("Retry-After"));
}

/** Parsed `data:` payloads of a server-sent-event stream, until `[DONE]`. */
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const boundary = /\r?\n\r?\n/;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = boundary.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload && payload.error) throw new ApiError(null, payload.error, null); // failed mid-stream
        yield payload;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

async function fetchModels() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

// ---------------------------------------------------------------------------- one answer canvas

const fmt = {
  seconds: (s) => (s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`),
  rate: (r) => (!isFinite(r) ? "–" : r >= 100 ? `${Math.round(r)}` : r.toFixed(1)),
  ratio: (r) => (!isFinite(r) ? "–" : r.toFixed(2)),
};

/** A canvas bound to one model: renders frames, keeps the counters, remembers frames for replay. */
class Lane {
  constructor(model, playbackMs) {
    this.model = model;
    this.playbackMs = playbackMs;
    this.el = ui.laneTemplate.content.firstElementChild.cloneNode(true);
    this.answer = $(".answer", this.el);
    this.before = $(".ctx-before", this.el);
    this.after = $(".ctx-after", this.el);
    this.bar = $(".progress-bar", this.el);
    this.status = $(".lane-status", this.el);
    this.counters = Object.fromEntries([...this.el.querySelectorAll("[data-counter]")].map((dd) => [dd.dataset.counter, dd]));
    this.replay = $(".replay", this.el);
    this.replayRange = $(".replay-range", this.el);
    this.replayStep = $(".replay-step", this.el);
    this.previewButton = $(".preview-btn", this.el);
    this.copyButton = $(".copy-btn", this.el);
    $(".lane-model", this.el).textContent = model.id;
    $(".lane-kind", this.el).textContent = describeModel(model);

    this.text = ""; // concatenated deltas: the settled text, and at the end the final answer
    this.settled = []; // [arrival time (ms), text length] each time the settled text grew: the race's clock
    this.spans = []; // one span per generated position
    this.shown = []; // what each span shows: a piece, or null while masked
    this.frames = []; // {step, tokens, committed} for replay
    this.queue = []; // frames waiting for slow playback
    this.lastCanvas = null; // the latest frame that arrived
    this.maxMasked = 0;
    this.framesDrawn = 0;
    this.usage = null;
    this.finishReason = null;
    this.startedAt = 0;
    this.firstFrameAt = 0;
    this.endedAt = 0;
    this.timer = 0;
    this.pump = 0;
    this.whenDrawn = null; // resolves once slow playback has caught up

    this.replayRange.addEventListener("input", () => this.showReplay(Number(this.replayRange.value)));
    this.copyButton.addEventListener("click", () => copyText(this.text, this.copyButton));
  }

  begin(before, after) {
    this.before.textContent = before;
    this.after.textContent = after;
    this.el.dataset.state = "running";
    this.status.textContent = "waiting for the first step…";
    this.startedAt = performance.now();
    const tick = () => {
      this.updateCounters();
      this.timer = requestAnimationFrame(tick);
    };
    this.timer = requestAnimationFrame(tick);
  }

  /** One streamed chunk: a text delta, maybe a canvas frame, maybe the finish reason or usage. */
  accept(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    const delta = choice.text ?? (choice.delta && choice.delta.content) ?? "";
    if (delta) {
      this.text += delta;
      this.settled.push([performance.now(), this.text.length]);
    }
    if (choice.canvas) this.acceptFrame(choice.canvas);
    else if (delta && !this.lastCanvas) this.drawPlain(this.text);
    if (choice.finish_reason) {
      this.finishReason = choice.finish_reason;
      this.endedAt = performance.now();
    }
  }

  acceptFrame(canvas) {
    const now = performance.now();
    if (!this.firstFrameAt) this.firstFrameAt = now;
    const frame = { step: canvas.step, tokens: canvas.tokens, committed: canvas.committed || [] };
    this.lastCanvas = frame;
    const last = this.frames[this.frames.length - 1];
    if (last && last.step === frame.step) this.frames[this.frames.length - 1] = frame; // the final chunk repeats the last step
    else if (this.frames.length < MAX_STORED_FRAMES) this.frames.push(frame);
    if (!this.playbackMs) {
      this.draw(frame, true);
      return;
    }
    this.queue.push(frame);
    if (!this.pump) this.pumpFrames();
  }

  pumpFrames() {
    const frame = this.queue.shift();
    if (!frame) {
      this.pump = 0;
      if (this.whenDrawn) this.whenDrawn();
      return;
    }
    this.draw(frame, true);
    this.pump = setTimeout(() => this.pumpFrames(), this.playbackMs);
  }

  /** Put a frame on the canvas: masked positions as glyphs, pieces as text, this step's commits lit. */
  draw(frame, animate) {
    const tokens = frame.tokens;
    if (this.spans.length !== tokens.length) this.resetSpans(tokens.length);
    let masked = 0;
    for (let i = 0; i < tokens.length; i++) {
      const piece = tokens[i];
      if (piece === null) masked++;
      if (piece === this.shown[i]) continue;
      const span = this.spans[i];
      if (piece === null) {
        span.className = "m";
        span.textContent = MASK_GLYPH;
      } else {
        span.className = "t";
        span.textContent = piece;
      }
      this.shown[i] = piece;
    }
    if (animate) {
      for (const i of frame.committed) {
        const span = this.spans[i];
        if (span && this.shown[i] !== null) span.className = "t fresh";
      }
    }
    this.framesDrawn += 1;
    this.maxMasked = Math.max(this.maxMasked, masked);
    this.el.dataset.frames = String(this.framesDrawn);
    this.el.dataset.maxMasked = String(this.maxMasked);
    this.el.dataset.masked = String(masked);
    this.el.dataset.step = String(frame.step);
    this.el.classList.add("has-output");
    this.counters.masked.textContent = `${masked} / ${tokens.length}`;
    this.bar.style.width = `${tokens.length ? (100 * (tokens.length - masked)) / tokens.length : 100}%`;
    if (this.el.dataset.state === "running") {
      const last = this.lastCanvas.step;
      this.status.textContent = this.endedAt && frame.step < last ? `replaying · step ${frame.step} of ${last}` : `step ${frame.step}`;
    }
  }

  resetSpans(n) {
    this.answer.replaceChildren();
    this.spans = [];
    this.shown = [];
    const fragment = document.createDocumentFragment();
    for (let i = 0; i < n; i++) {
      const span = document.createElement("span");
      span.className = "m";
      span.textContent = MASK_GLYPH;
      this.spans.push(span);
      this.shown.push(null);
      fragment.append(span);
    }
    this.answer.append(fragment);
  }

  drawPlain(text) {
    this.spans = [];
    this.shown = [];
    this.answer.textContent = text;
    this.el.classList.add("has-output");
  }

  /** The stream ended normally: settle the canvas on the final text and freeze the counters. */
  async finish() {
    if (!this.endedAt) this.endedAt = performance.now();
    this.updateCounters();
    if (this.queue.length || this.pump) {
      await new Promise((resolve) => (this.whenDrawn = resolve));
    }
    cancelAnimationFrame(this.timer);
    // The deltas are the answer (stop strings and held-back text are applied there); the canvas
    // pieces normally join to the same text, otherwise the text wins.
    const canvasText = this.shown.every((p) => p !== null) ? this.shown.join("") : null;
    if (canvasText !== this.text) this.drawPlain(this.text);
    this.bar.style.width = "100%";
    this.counters.masked.textContent = this.lastCanvas ? `0 / ${this.lastCanvas.tokens.length}` : "–";
    this.el.dataset.state = "done";
    this.status.textContent = this.finishReason ? `finished · ${this.finishReason}` : "finished";
    this.copyButton.disabled = false;
    this.offerReplay();
    this.updateCounters();
  }

  fail(error) {
    this.stopTimers();
    const stopped = error.name === "AbortError";
    this.el.dataset.state = stopped ? "stopped" : "error";
    this.status.textContent = stopped ? "stopped" : `error${error.status ? " " + error.status : ""}`;
    if (!stopped) {
      const note = $(".lane-error", this.el);
      note.textContent = error.message;
      note.hidden = false;
    }
    this.updateCounters();
    if (this.text) this.copyButton.disabled = false;
  }

  stopTimers() {
    cancelAnimationFrame(this.timer);
    clearTimeout(this.pump);
    this.pump = 0;
    this.queue = [];
    if (!this.endedAt) this.endedAt = performance.now();
    if (this.whenDrawn) this.whenDrawn();
  }

  get elapsed() {
    return ((this.endedAt || performance.now()) - this.startedAt) / 1000;
  }

  /** Generated tokens: the server's count when it sent usage, else the decided canvas positions. */
  get tokens() {
    if (this.usage && Number.isFinite(this.usage.completion_tokens)) return this.usage.completion_tokens;
    if (!this.lastCanvas) return null;
    return this.lastCanvas.tokens.reduce((n, p) => n + (p !== null && p !== "" ? 1 : 0), 0);
  }

  updateCounters() {
    if (!this.startedAt) return;
    const elapsed = this.elapsed;
    this.counters.elapsed.textContent = fmt.seconds(elapsed);
    const tokens = this.tokens;
    const steps = this.lastCanvas ? this.lastCanvas.step : null;
    if (tokens !== null && elapsed > 0) this.counters.tps.textContent = fmt.rate(tokens / elapsed);
    if (steps) {
      this.counters.steps.textContent = String(steps);
      if (tokens !== null) this.counters["tps-step"].textContent = fmt.ratio(tokens / steps);
    }
    if (this.firstFrameAt) this.counters.first.textContent = fmt.seconds((this.firstFrameAt - this.startedAt) / 1000);
  }

  offerReplay() {
    if (this.frames.length < 2) return;
    this.replay.hidden = false;
    this.replayRange.max = String(this.frames.length);
    this.replayRange.value = String(this.frames.length);
    this.replayStep.textContent = `step ${this.frames[this.frames.length - 1].step}`;
  }

  showReplay(index) {
    const frame = this.frames[index - 1];
    if (!frame) return;
    this.replayStep.textContent = `step ${frame.step}`;
    if (index === this.frames.length) {
      this.drawPlain(this.text);
      this.counters.masked.textContent = `0 / ${frame.tokens.length}`;
      return;
    }
    this.resetSpans(frame.tokens.length);
    const count = this.framesDrawn;
    this.draw(frame, true);
    this.framesDrawn = count;
  }

  /** Seconds from the request until the first `chars` characters of the answer had settled; null if they never did. */
  timeTo(chars) {
    const reached = this.settled.find(([, length]) => length >= chars);
    return reached ? (reached[0] - this.startedAt) / 1000 : null;
  }

  /** The race's verdict on this lane: a badge and, for a ranked lane, its time to the common text. */
  showVerdict(verdict) {
    const badge = $(".badge", this.el);
    badge.hidden = false;
    badge.textContent = verdict.badge;
    badge.title = verdict.detail || "";
    badge.classList.toggle("winner", verdict.won);
    badge.classList.toggle("note", !verdict.won);
    this.el.classList.toggle("won", verdict.won);
    this.el.dataset.ranked = String(verdict.ranked);
    if (verdict.seconds !== null) this.el.dataset.raceSeconds = String(verdict.seconds);
  }
}

/**
 * Who won a race, honestly. `entries`: per lane {name, text, timeTo(chars) -> seconds | null}.
 * A lane that wrote no text, or stopped before RACE_MIN_CHARS characters, is not ranked. The
 * ranked lanes are compared on the time each took to settle the same text: the first N
 * characters, N the shorter answer's length. Returns per lane {badge, detail, won, ranked, seconds}
 * and the common length `chars` (null when no comparison could be made).
 */
export function raceVerdict(entries) {
  const unranked = (entry) => {
    const written = entry.text.trim().length;
    if (!written) return "no text";
    if (written < RACE_MIN_CHARS) return `stopped after ${written} character${written === 1 ? "" : "s"}`;
    return null;
  };
  const reasons = entries.map(unranked);
  const ranked = entries.filter((_, i) => reasons[i] === null);
  const verdicts = entries.map((entry, i) => ({
    badge: reasons[i] ? `not ranked · ${reasons[i]}` : "",
    detail: reasons[i] ? `${entry.name} is left out of the race: ${reasons[i]}` : "",
    won: false,
    ranked: reasons[i] === null,
    seconds: null,
  }));
  if (ranked.length < 2) {
    entries.forEach((entry, i) => {
      if (reasons[i] === null) {
        verdicts[i].badge = "no race · the other lane is not ranked";
        verdicts[i].detail = "a race needs two answers with text to compare";
      }
    });
    return { verdicts, chars: null };
  }
  const chars = Math.min(...ranked.map((entry) => entry.text.length));
  const times = entries.map((entry, i) => (reasons[i] === null ? entry.timeTo(chars) : null));
  if (times.some((t, i) => reasons[i] === null && t === null)) {
    entries.forEach((_, i) => {
      if (reasons[i] === null) verdicts[i].badge = "no race · settling times unknown";
    });
    return { verdicts, chars: null };
  }
  const order = entries.map((_, i) => i).filter((i) => reasons[i] === null).sort((a, b) => times[a] - times[b]);
  const [first, second] = order;
  const ratio = times[second] / Math.max(times[first], 1e-6);
  const factor = `${ratio.toFixed(ratio < 1.1 ? 2 : ratio < 10 ? 1 : 0)}×`;
  const detail = order.map((i) => `${entries[i].name} ${times[i].toFixed(2)} s`).join(", ");
  for (const i of order) {
    verdicts[i].seconds = times[i];
    verdicts[i].detail = `time to the first ${chars} characters of the answer: ${detail}`;
    verdicts[i].badge = i === first ? `winner · ${factor} faster to ${chars} chars` : `${factor} slower to ${chars} chars`;
  }
  verdicts[first].won = true;
  return { verdicts, chars };
}

/** "diffusion" or "autoregressive" when the server says (GET /v1/models cards carry `diffusion` / `attention`). */
function describeModel(model) {
  if (typeof model.diffusion === "boolean") return model.diffusion ? "diffusion" : "autoregressive";
  if (model.attention === "causal") return "autoregressive";
  if (model.attention) return "diffusion";
  return "";
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => (button.textContent = "Copy"), 1200);
}

// ---------------------------------------------------------------------------- HTML preview

/** The HTML document in a text: a ```html fence, or everything from <!doctype html> / <html> on. */
export function extractHtml(text) {
  const fence = /```html[^\n]*\n([\s\S]*?)(?:```|$)/i.exec(text);
  if (fence && /<[a-z!]/i.test(fence[1])) return fence[1];
  const start = text.search(/<!doctype\s+html|<html[\s>]/i);
  if (start < 0) return null;
  const rest = text.slice(start);
  const end = /<\/html\s*>/i.exec(rest);
  return end ? rest.slice(0, end.index + end[0].length) : rest;
}

function openPreview(html, model) {
  // sandbox="allow-scripts" only (set in the markup): the page runs, but in an opaque origin with
  // no access to this page, its storage or the API key.
  ui.previewFrame.setAttribute("sandbox", "allow-scripts");
  ui.previewFrame.srcdoc = html;
  $(".label", ui.preview).textContent = `Preview · ${model}`;
  ui.preview.hidden = false;
  ui.preview.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function closePreview() {
  ui.preview.hidden = true;
  ui.previewFrame.removeAttribute("srcdoc");
}

// ---------------------------------------------------------------------------- settings and requests

function numberOrNull(input) {
  const raw = input.value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  return Number.isFinite(value) ? value : raw; // a non-number goes to the server, which says what is wrong
}

function decodingSettings() {
  const settings = {
    max_tokens: numberOrNull(ui.maxTokens),
    steps: numberOrNull(ui.steps),
    block_size: numberOrNull(ui.blockSize),
    policy: ui.policy.value || null,
    threshold: ui.policy.value === "threshold" ? numberOrNull(ui.threshold) : null,
    factor: ui.policy.value === "factor" ? numberOrNull(ui.factor) : null,
    temperature: numberOrNull(ui.temperature),
    seed: numberOrNull(ui.seed),
  };
  return Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== null));
}

/** The request for the current mode: endpoint, body (without model) and the visible context. */
function buildRequest() {
  const body = { ...decodingSettings(), stream: true, diffusing: true, stream_options: { include_usage: true } };
  if (state.mode === "chat") {
    const messages = [];
    const system = ui.chatSystem.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.chat, { role: "user", content: ui.chatInput.value });
    return { path: ENDPOINTS.chat, body: { ...body, messages }, before: "", after: "" };
  }
  if (state.mode === "fim") {
    const prefix = ui.fimPrefix.value;
    const suffix = ui.fimSuffix.value;
    return { path: ENDPOINTS.fim, body: { ...body, prompt: prefix, suffix }, before: prefix, after: suffix };
  }
  const prompt = ui.prompt.value;
  return { path: ENDPOINTS.completion, body: { ...body, prompt }, before: prompt, after: "" };
}

const SAVED = ["maxTokens", "steps", "blockSize", "policy", "threshold", "factor", "temperature", "seed", "playback"];

function saveSettings() {
  const values = Object.fromEntries(SAVED.map((name) => [name, ui[name].value]));
  try {
    localStorage.setItem("unmask.settings", JSON.stringify(values));
  } catch {
    // storage may be unavailable (private mode): settings just do not persist
  }
}

function restoreSettings() {
  let values = {};
  try {
    values = JSON.parse(localStorage.getItem("unmask.settings") || "{}");
  } catch {
    values = {};
  }
  for (const name of SAVED) if (typeof values[name] === "string") ui[name].value = values[name];
  policyFields();
}

/** A policy's parameter field is open only while that policy is chosen. */
function policyFields() {
  ui.threshold.disabled = ui.policy.value !== "threshold";
  ui.factor.disabled = ui.policy.value !== "factor";
}

// ---------------------------------------------------------------------------- running

function showError(errors) {
  if (!errors.length) {
    ui.error.hidden = true;
    return;
  }
  const lines = errors.map(({ model, error }) => {
    const where = model ? `${model}: ` : "";
    return `${where}${error.message}`;
  });
  const first = errors[0].error;
  const parts = [first.status ? `Error ${first.status}` : "Error"];
  if (first.type) parts.push(first.type);
  if (first.code) parts.push(first.code);
  if (first.param) parts.push(`param: ${first.param}`);
  if (first.retryAfter) parts.push(`retry after ${first.retryAfter} s`);
  $(".error-title", ui.error).textContent = parts.join(" · ");
  $(".error-message", ui.error).textContent = lines.join("\n");
  ui.error.hidden = false;
}

/** Send `request` to the lane's model and play its stream on the lane. */
async function streamInto(lane, request, signal) {
  lane.begin(request.before, request.after);
  const body = JSON.stringify({ ...request.body, model: lane.model.id });
  const response = await fetch(request.path, { method: "POST", headers: authHeaders(), body, signal });
  if (!response.ok) throw await errorFrom(response);
  for await (const chunk of readEvents(response)) lane.accept(chunk);
  await lane.finish();
}

function selectedModels() {
  const primary = state.models.find((m) => m.id === ui.model.value) || { id: ui.model.value };
  const chosen = [primary];
  if (ui.race.checked && !ui.race.disabled && state.mode !== "fim") {
    const other = state.models.find((m) => m.id === ui.raceModel.value);
    if (other && other.id !== primary.id) chosen.push(other);
  }
  return chosen;
}

async function run() {
  if (state.controller) return;
  const request = buildRequest();
  const models = selectedModels();
  const userMessage = state.mode === "chat" ? ui.chatInput.value : null;
  showError([]);
  closePreview();
  saveSettings();

  const playbackMs = Number(ui.playback.value) || 0;
  const lanes = models.map((model) => new Lane(model, playbackMs));
  ui.lanes.replaceChildren(...lanes.map((lane) => lane.el));
  ui.lanes.classList.toggle("racing", lanes.length > 1);
  delete ui.lanes.dataset.raceChars;

  if (userMessage !== null) {
    appendChatMessage({ role: "user", content: userMessage }, true);
    ui.chatInput.value = "";
  }

  const controller = new AbortController();
  state.controller = controller;
  document.body.dataset.running = "true";
  ui.run.disabled = true;
  ui.stop.hidden = false;

  const outcomes = await Promise.allSettled(
    lanes.map((lane) =>
      streamInto(lane, request, controller.signal).catch((error) => {
        lane.fail(error);
        throw error;
      }),
    ),
  );

  const errors = outcomes
    .map((outcome, i) => ({ outcome, model: lanes.length > 1 ? lanes[i].model.id : null }))
    .filter(({ outcome }) => outcome.status === "rejected" && outcome.reason.name !== "AbortError")
    .map(({ outcome, model }) => ({ model, error: outcome.reason }));
  showError(errors);

  const finished = lanes.filter((lane) => lane.el.dataset.state === "done");
  if (lanes.length > 1 && finished.length === lanes.length) {
    const { verdicts, chars } = raceVerdict(lanes.map((lane) => ({ name: lane.model.id, text: lane.text, timeTo: (n) => lane.timeTo(n) })));
    lanes.forEach((lane, i) => lane.showVerdict(verdicts[i]));
    if (chars !== null) ui.lanes.dataset.raceChars = String(chars);
  }
  for (const lane of finished) offerPreview(lane, request);

  if (userMessage !== null) {
    const pending = ui.chatHistory.querySelector(".pending");
    if (lanes[0].el.dataset.state === "done") {
      state.chat.push({ role: "user", content: userMessage }, { role: "assistant", content: lanes[0].text });
      if (pending) pending.classList.remove("pending");
      appendChatMessage({ role: "assistant", content: lanes[0].text, model: lanes[0].model.id });
    } else {
      if (pending) pending.remove();
      if (!state.chat.length) renderChatEmpty();
      ui.chatInput.value = userMessage;
    }
  }

  state.controller = null;
  state.runs += 1;
  document.body.dataset.runs = String(state.runs);
  delete document.body.dataset.running;
  ui.run.disabled = false;
  ui.stop.hidden = true;
}

function offerPreview(lane, request) {
  // Completion and FIM answers continue the visible context, so the document may start in the prompt.
  const html = extractHtml(request.before + lane.text + request.after);
  if (!html) return;
  lane.previewButton.hidden = false;
  lane.previewButton.onclick = () => openPreview(html, lane.model.id);
}

// ---------------------------------------------------------------------------- chat history

function renderChatEmpty() {
  const li = document.createElement("li");
  li.className = "chat-empty";
  li.textContent = "No messages yet. The whole conversation is sent with every turn.";
  ui.chatHistory.replaceChildren(li);
}

function appendChatMessage(message, pending = false) {
  const empty = ui.chatHistory.querySelector(".chat-empty");
  if (empty) empty.remove();
  const li = document.createElement("li");
  li.className = `msg ${message.role}${pending ? " pending" : ""}`;
  const role = document.createElement("span");
  role.className = "msg-role";
  role.textContent = message.role === "assistant" && message.model ? message.model : message.role;
  const body = document.createElement("div");
  body.className = "msg-body";
  body.textContent = message.content;
  li.append(role, body);
  ui.chatHistory.append(li);
  ui.chatHistory.scrollTop = ui.chatHistory.scrollHeight;
}

// ---------------------------------------------------------------------------- page wiring

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[data-mode]")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  for (const pane of document.querySelectorAll("[data-pane]")) pane.hidden = pane.dataset.pane !== mode;
  document.body.dataset.mode = mode;
  renderExamples();
  updateRaceControls();
}

function renderExamples() {
  const buttons = EXAMPLES[state.mode].map((example) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip";
    button.textContent = example.label;
    button.addEventListener("click", () => {
      if (state.mode === "completion") ui.prompt.value = example.prompt;
      else if (state.mode === "chat") ui.chatInput.value = example.prompt;
      else {
        ui.fimPrefix.value = example.prefix;
        ui.fimSuffix.value = example.suffix;
      }
    });
    return button;
  });
  ui.examples.replaceChildren(...buttons);
}

function updateRaceControls() {
  const several = state.models.length > 1;
  const fim = state.mode === "fim";
  ui.race.disabled = !several || fim;
  ui.raceHint.textContent = !several ? RACE_HINT_ONE_MODEL : fim ? "Races run in completion and chat modes." : "";
  ui.raceHint.hidden = several && !fim;
  ui.raceModelField.hidden = !(several && !fim && ui.race.checked);
  if (several && ui.raceModel.value === ui.model.value) {
    const other = state.models.find((m) => m.id !== ui.model.value);
    if (other) ui.raceModel.value = other.id;
  }
}

function fillModelSelect(select, models, preferred) {
  const options = models.map((model) => {
    const option = document.createElement("option");
    option.value = model.id;
    const kind = describeModel(model);
    option.textContent = kind ? `${model.id} · ${kind}` : model.id;
    return option;
  });
  select.replaceChildren(...options);
  if (preferred && models.some((m) => m.id === preferred)) select.value = preferred;
}

async function loadModels() {
  try {
    state.models = await fetchModels();
    showError([]);
  } catch (error) {
    state.models = [];
    showError([{ model: null, error }]);
  }
  const firstDiffusion = state.models.find((m) => describeModel(m) === "diffusion");
  fillModelSelect(ui.model, state.models, ui.model.value || (firstDiffusion && firstDiffusion.id));
  const other = state.models.find((m) => m.id !== ui.model.value);
  fillModelSelect(ui.raceModel, state.models, other && other.id);
  if (!state.models.length) ui.model.replaceChildren(new Option("no models", ""));
  ui.race.checked = state.models.length > 1;
  updateRaceControls();
  document.body.dataset.models = String(state.models.length);
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
}

function initTheme() {
  let saved = null;
  try {
    saved = localStorage.getItem("unmask.theme");
  } catch {
    saved = null;
  }
  const prefersLight = window.matchMedia && window.matchMedia("(prefers-color-scheme: light)").matches;
  applyTheme(saved || (prefersLight ? "light" : "dark"));
  ui.theme.addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    applyTheme(next);
    try {
      localStorage.setItem("unmask.theme", next);
    } catch {
      // not persisted
    }
  });
}

function init() {
  initTheme();
  restoreSettings();
  for (const tab of document.querySelectorAll("[data-mode]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  ui.run.addEventListener("click", run);
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.policy.addEventListener("change", policyFields);
  ui.race.addEventListener("change", updateRaceControls);
  ui.model.addEventListener("change", updateRaceControls);
  ui.apiKey.addEventListener("change", loadModels);
  $("#access").addEventListener("submit", (event) => {
    event.preventDefault();
    loadModels();
  });
  ui.previewClose.addEventListener("click", closePreview);
  ui.chatClear.addEventListener("click", () => {
    state.chat = [];
    renderChatEmpty();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    } else if (event.key === "Escape" && state.controller) {
      state.controller.abort();
    }
  });
  setMode("completion");
  const idle = new Lane({ id: "no run yet" }, 0);
  idle.el.classList.add("placeholder");
  ui.lanes.replaceChildren(idle.el);
  loadModels().then(() => {
    document.body.dataset.ready = "true";
    $(".lane-model", idle.el).textContent = ui.model.value || "no model";
  });
}

init();
