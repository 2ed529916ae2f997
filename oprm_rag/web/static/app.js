// oprm-rag web page: upload or paste a document, ask, stream the answer, show where it came from.
// Plain browser JavaScript (no build step, no libraries): the server streams NDJSON lines from
// POST /api/ask; this file draws the entropy chart as SVG and highlights the winning chunk.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  doc: null,          // {doc_id, name, chars, text, units}
  textDirty: false,   // the textarea changed since it was last uploaded
  upload: null,       // the upload in flight (a Promise), so Ask waits for it
  controller: null,   // aborts the answer being streamed when a new question is asked
  chunks: [],
};

// ---------------------------------------------------------------- errors and requests
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorFrom(response) {
  // The server answers errors as {"error": "..."}; anything else (a proxy page) gets its status.
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return new Error(body.error);
  } catch (_) { /* not JSON */ }
  return new Error(`the server answered ${response.status} ${response.statusText}`);
}

async function requestJSON(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// ---------------------------------------------------------------- offsets
// The engine's offsets count Unicode code points; JavaScript strings index UTF-16 units.
// They differ only past characters outside the Basic Multilingual Plane (emoji, rare CJK),
// so a table is built only for texts that hold such characters.
function unitTable(text) {
  if (!/[\uD800-\uDFFF]/.test(text)) return null;
  const table = new Uint32Array(text.length + 1);
  let cp = 0, unit = 0;
  for (const ch of text) {
    table[cp++] = unit;
    unit += ch.length;
  }
  table[cp] = unit;
  return table.subarray(0, cp + 1);
}

function toUnits(cp) {
  const units = state.doc && state.doc.units;
  return units ? units[Math.min(cp, units.length - 1)] : cp;
}

// ---------------------------------------------------------------- the document
async function useDocument(info) {
  const full = await requestJSON(`/api/documents/${encodeURIComponent(info.doc_id)}`);
  state.doc = { ...full, units: unitTable(full.text) };
  const box = $("doc-info");
  box.textContent = `${full.name}: ${full.chars.toLocaleString()} characters`;
  box.dataset.docId = full.doc_id;
  renderDocument(null);
  resetResults();
}

function renderDocument(span) {
  const pane = $("document");
  pane.replaceChildren();
  if (!state.doc) return;
  const text = state.doc.text;
  if (!span) {
    pane.append(text);
    return;
  }
  const start = toUnits(span.char_start), end = toUnits(span.char_end);
  const mark = document.createElement("mark");
  mark.id = "winner";
  mark.dataset.start = String(span.char_start);
  mark.dataset.end = String(span.char_end);
  mark.textContent = text.slice(start, end);
  pane.append(text.slice(0, start), mark, text.slice(end));
  // Scroll the document pane only (not the page, which would hide the answer); the pane is
  // positioned, so it is the mark's offsetParent.
  pane.scrollTop = Math.max(0, mark.offsetTop - pane.clientHeight / 4);
}

function focusChunk(chunk) {
  // Outline a chunk picked on the chart without touching the DOM (CSS Custom Highlight API,
  // where the browser has it), and scroll the pane to it.
  const pane = $("document");
  let offset = toUnits(chunk.char_start);
  let node = null;
  for (const child of pane.childNodes) {
    const textNode = child.nodeType === Node.TEXT_NODE ? child : child.firstChild;
    const length = textNode ? textNode.length : 0;
    if (offset <= length) { node = textNode; break; }
    offset -= length;
  }
  if (!node) return;
  const range = document.createRange();
  range.setStart(node, offset);
  const endOffset = Math.min(node.length, offset + toUnits(chunk.char_end) - toUnits(chunk.char_start));
  range.setEnd(node, endOffset);
  if (window.CSS && CSS.highlights && typeof Highlight === "function") {
    CSS.highlights.set("chunk-focus", new Highlight(range));
  }
  const rect = range.getBoundingClientRect(), paneRect = pane.getBoundingClientRect();
  pane.scrollTop += rect.top - paneRect.top - pane.clientHeight / 4;
}

// ---------------------------------------------------------------- uploads
function uploadFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return requestJSON("/api/documents", { method: "POST", body: form });
}

function uploadText(text) {
  return requestJSON("/api/documents", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, name: "pasted text" }),
  });
}

function startUpload(makeRequest, label) {
  showError("");
  state.doc = null;
  $("doc-info").textContent = `Reading ${label}…`;
  delete $("doc-info").dataset.docId;
  state.upload = (async () => {
    try {
      await useDocument(await makeRequest());
    } catch (err) {
      $("doc-info").textContent = "No document yet.";
      renderDocument(null);
      throw err;
    } finally {
      state.upload = null;
    }
  })();
  return state.upload;
}

// ---------------------------------------------------------------- the chart
function drawChart(chunks) {
  const box = $("chart");
  box.replaceChildren();
  state.chunks = chunks;
  const W = 640, H = 170, left = 44, right = 8, top = 10, bottom = 26;
  const plotW = W - left - right, plotH = H - top - bottom;
  const top_ = chunks.reduce((m, c) => Math.max(m, c.entropy || 0), 0) || 1;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `first-token entropy of ${chunks.length} chunks`);
  const el = (name, attrs, text) => {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  el("line", { x1: left, y1: top + plotH, x2: W - right, y2: top + plotH, class: "axis" });
  el("line", { x1: left, y1: top, x2: left, y2: top + plotH, class: "axis" });
  el("text", { x: left - 4, y: top + 8, class: "tick", "text-anchor": "end" }, top_.toFixed(2));
  el("text", { x: left - 4, y: top + plotH, class: "tick", "text-anchor": "end" }, "0");
  el("text", { x: 12, y: top + plotH / 2, class: "label", transform: `rotate(-90 12 ${top + plotH / 2})`,
    "text-anchor": "middle" }, "nats");
  el("text", { x: left + plotW / 2, y: H - 6, class: "label", "text-anchor": "middle" },
    `chunk (document order), ${chunks.length} in all`);
  const step = plotW / Math.max(1, chunks.length);
  const gap = step > 4 ? Math.min(2, step * 0.15) : 0;
  chunks.forEach((c, i) => {
    const h = Math.max(1, (plotH * (c.entropy || 0)) / top_);
    const kind = c.selected ? "winner" : c.is_idk ? "idk" : "scored";
    const bar = el("rect", { x: left + i * step + gap / 2, y: top + plotH - h, width: Math.max(0.5, step - gap),
      height: h, class: `bar ${kind}`, "data-index": i });
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = describeChunk(c);
    bar.append(title);
    bar.addEventListener("click", () => {
      $("chunk-info").textContent = describeChunk(c);
      focusChunk(c);
    });
  });
  box.append(svg);
}

function describeChunk(c) {
  const entropy = c.entropy === null ? "n/a" : `${c.entropy.toFixed(3)} nats`;
  const verdict = c.selected ? " (winner)" : c.is_idk ? " (answered IDK: dropped)" : "";
  const prob = c.top_prob === null ? "" : ` p=${c.top_prob.toFixed(2)}`;
  return `chunk ${c.index}: chars ${c.char_start}–${c.char_end}, entropy ${entropy}, ` +
    `top token ${JSON.stringify(c.top_token)}${prob}${verdict}`;
}

// ---------------------------------------------------------------- asking
function resetResults() {
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "idle";
  $("answer-info").textContent = "";
  $("chunk-info").textContent = "";
  $("chart").replaceChildren();
  if (window.CSS && CSS.highlights) CSS.highlights.delete("chunk-focus");
}

function onEvent(event) {
  const answer = $("answer");
  if (event.type === "scores") {
    drawChart(event.chunks);
    renderDocument(event.winner);
    const idk = event.chunks.filter((c) => c.is_idk).length;
    const size = event.usage.chunk_tokens;
    const scored = `Scored ${event.chunks.length} chunks of up to ${size ?? "all"} tokens ` +
      `in ${event.scoring_seconds.toFixed(2)} s (${idk} answered ${JSON.stringify(event.idk_word)}).`;
    $("answer-info").title = event.usage.chunk_tokens_reason || "";
    $("answer-info").textContent = event.winner
      ? `${scored} Answering from chunk ${event.winner.index} (chars ${event.winner.char_start}–` +
        `${event.winner.char_end}).`
      : `${scored} No chunk can answer (${event.no_answer_reason}): the document does not seem to ` +
        "hold the answer.";
    answer.dataset.state = "streaming";
  } else if (event.type === "piece") {
    answer.append(event.text);
  } else if (event.type === "done") {
    answer.dataset.state = "done";
    const u = event.usage || {};
    $("answer-info").textContent += ` Done in ${event.seconds.toFixed(2)} s: ${u.output_tokens ?? 0} tokens ` +
      `decoded, ${u.input_tokens ?? 0} prefilled, ${u.cached_chunks ?? 0} chunk states from cache.`;
  } else if (event.type === "error") {
    answer.dataset.state = "error";
    showError(event.error);
  }
}

async function readLines(body, handle) {
  // NDJSON: one event per line; a read may end mid-line, so keep the remainder.
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) {
        last = JSON.parse(line);
        handle(last);
      }
    }
    if (done) break;
  }
  if (!last || (last.type !== "done" && last.type !== "error")) {
    throw new Error("the connection closed before the answer was finished");
  }
}

async function ensureDocument() {
  if (state.upload) {
    await state.upload;
  }
  const file = $("file").files[0];
  if (state.textDirty) {
    state.textDirty = false;
    await startUpload(() => uploadText($("text").value), "the pasted text");
  } else if (!state.doc && file) {
    await startUpload(() => uploadFile(file), file.name);
  } else if (!state.doc) {
    // Nothing chosen: send what is there and let the server say what is wrong with it.
    await startUpload(() => uploadText($("text").value), "the pasted text");
  }
}

async function ask(event) {
  event.preventDefault();
  showError("");
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const button = $("ask");
  button.disabled = true;
  try {
    await ensureDocument();
    resetResults();
    renderDocument(null);
    $("answer").dataset.state = "scoring";
    $("answer-info").textContent = "Scoring every chunk…";
    const response = await fetch("/api/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ doc_id: state.doc.doc_id, question: $("question").value }),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 404) state.doc = null;  // evicted on the server: upload again next time
      throw await errorFrom(response);
    }
    await readLines(response.body, onEvent);
  } catch (err) {
    if (err.name === "AbortError") return;
    $("answer").dataset.state = "error";
    if (!$("answer-info").textContent.startsWith("Scored")) $("answer-info").textContent = "";
    showError(err.message);
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      button.disabled = false;
    }
  }
}

// ---------------------------------------------------------------- start
async function checkHealth() {
  const box = $("model-status");
  try {
    const h = await requestJSON("/api/health");
    const name = h.model.split(/[\\/]/).filter(Boolean).pop() || h.model;
    box.textContent = h.model_loaded
      ? `Model: ${name} (${h.family}, chunks of ${h.chunk_tokens ?? "whole documents"} tokens)`
      : `Model: ${name} (loads on the first question)`;
  } catch (err) {
    box.textContent = `The server is not answering: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (!file) return;
    state.textDirty = false;
    $("text").value = "";
    startUpload(() => uploadFile(file), file.name).catch((err) => showError(err.message));
  });
  $("text").addEventListener("input", () => {
    state.textDirty = true;
    $("file").value = "";
  });
  checkHealth();
});
