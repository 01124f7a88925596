// oshepherd's fleet dashboard (docs/dashboard.md): reads /oshepherd/v1/fleet (workers, queues,
// the fleet's throughput) and /oshepherd/v1/ttft (this API process's TTFT histogram) every
// second and redraws the tables. Plain script, no build step, nothing fetched from elsewhere.
// Once keys exist both routes need an admin key: the page asks for it, keeps it in this tab's
// sessionStorage and sends it as x-api-key. /oshepherd/#key=SECRET stores it too (the
// fragment never leaves the browser) and is then taken out of the address bar.
"use strict";

(() => {
  const POLL_MS = 1000;
  const WINDOW_MS = 60000; // TTFT over the last minute, from histogram differences
  const KEY = "oshepherd.key";
  const PRIORITIES = ["high", "normal", "low"];
  const samples = []; // TTFT readings of one API process: {at, process, models: Map}
  let timer = null;

  class AuthError extends Error {}

  const $ = (selector) => document.querySelector(selector);

  function takeKeyFromFragment() {
    const match = /^#key=(.+)$/.exec(window.location.hash);
    if (!match) return;
    sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  async function get(path) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers["x-api-key"] = key;
    const response = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const message = (body && (body.error?.message || body.error)) || response.statusText;
    if (response.status === 401 || response.status === 403) throw new AuthError(message);
    if (!response.ok) throw new Error(`${path}: ${response.status} ${message}`);
    return body;
  }

  async function poll() {
    timer = null;
    try {
      const [fleet, ttft] = await Promise.all([get("v1/fleet"), get("v1/ttft")]);
      noteTtft(ttft);
      render(fleet, ttft);
      setStatus(`Live · updated ${new Date().toLocaleTimeString()}`, false);
    } catch (error) {
      if (error instanceof AuthError) {
        askForKey(error.message);
        return; // until a key is given
      }
      setStatus(`Cannot read the fleet: ${error.message}`, true);
    }
    timer = window.setTimeout(poll, POLL_MS);
  }

  function setStatus(text, isError) {
    const status = $("#status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function askForKey(reason) {
    sessionStorage.removeItem(KEY);
    $("#key-reason").textContent = `This fleet needs an admin API key (${reason}).`;
    $("#key-form").hidden = false;
    setStatus("Waiting for an admin API key", true);
    $("#key").focus();
  }

  function useKey(event) {
    event.preventDefault();
    const input = $("#key");
    sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    $("#key-form").hidden = true;
    setStatus("Connecting…", false);
    if (timer !== null) window.clearTimeout(timer);
    poll();
  }

  // ---- rendering ------------------------------------------------------------------------

  function cell(text, field, numeric) {
    const td = document.createElement("td");
    td.textContent = text;
    if (field) td.dataset.field = field;
    if (numeric) td.className = "num";
    return td;
  }

  function fillTable(id, rows, emptyText) {
    const body = $(`#${id} tbody`);
    if (rows.length === 0) {
      const td = cell(emptyText);
      td.colSpan = $(`#${id} thead tr`).children.length;
      td.classList.add("empty");
      const tr = document.createElement("tr");
      tr.append(td);
      rows = [tr];
    }
    body.replaceChildren(...rows);
  }

  function row(data, cells) {
    const tr = document.createElement("tr");
    for (const [name, value] of Object.entries(data)) tr.dataset[name] = value;
    tr.append(...cells);
    return tr;
  }

  function render(fleet, ttft) {
    renderWorkers(fleet.workers);
    const waiting = renderQueues(fleet.queues);
    const overall = renderModels(fleet.throughput, ttft);
    const healthy = fleet.workers.filter((w) => w.healthy).length;
    const busy = fleet.workers.reduce((n, w) => n + w.in_flight, 0);
    const slots = fleet.workers.reduce((n, w) => n + w.slots, 0);
    summary("workers", `${healthy} / ${fleet.workers.length}`);
    summary("slots", `${busy} / ${slots}`);
    summary("waiting", String(waiting));
    summary("rps", rate(fleet.throughput.requests_per_second));
    summary("tps", rate(fleet.throughput.completion_tokens_per_second));
    summary(
      "ttft",
      ttft.enabled
        ? `${seconds(quantile(0.5, overall))} / ${seconds(quantile(0.95, overall))}`
        : "metrics off",
    );
  }

  function summary(field, text) {
    $(`#summary [data-field="${field}"]`).textContent = text;
  }

  function renderWorkers(workers) {
    const now = Date.now() / 1000;
    const rows = workers.map((w) => {
      const health = cell(w.healthy ? "healthy" : `unhealthy: ${w.error || "no answer"}`, "health");
      health.classList.add(w.healthy ? "healthy" : "unhealthy");
      return row({ worker: w.id }, [
        cell(w.id, "id"),
        cell(w.hostname, "host"),
        health,
        cell(`${w.in_flight} / ${w.slots}`, "slots", true),
        cell(w.models.join(", ") || "none", "models"),
        cell(w.loaded.join(", ") || "none", "loaded"),
        cell(w.version || "?", "version"),
        cell(w.last_seen ? `${Math.max(0, Math.round(now - w.last_seen))} s ago` : "?", "seen"),
      ]);
    });
    fillTable("workers", rows, "No live workers");
  }

  function renderQueues(queues) {
    const models = new Map();
    for (const q of queues) {
      const m = models.get(q.model) ?? { high: 0, normal: 0, low: 0, oldest: null };
      m[q.priority] = q.depth;
      if (q.oldest_wait !== null) m.oldest = Math.max(m.oldest ?? 0, q.oldest_wait);
      models.set(q.model, m);
    }
    let waiting = 0;
    const rows = [...models].map(([model, m]) => {
      const total = PRIORITIES.reduce((n, p) => n + m[p], 0);
      waiting += total;
      return row({ model }, [
        cell(model, "model"),
        ...PRIORITIES.map((p) => cell(String(m[p]), p, true)),
        cell(String(total), "waiting", true),
        cell(m.oldest === null ? "–" : seconds(m.oldest), "oldest", true),
      ]);
    });
    fillTable("queues", rows, "No models held");
    return waiting;
  }

  function renderModels(throughput, ttft) {
    const rates = new Map(throughput.models.map((m) => [m.model, m]));
    const names = [...new Set([...rates.keys(), ...ttft.models.map((m) => m.model)])].sort();
    const deltas = names.map((name) => windowed(name));
    const rows = names.map((name, i) => {
      const r = rates.get(name) ?? {};
      const d = deltas[i];
      return row({ model: name }, [
        cell(name, "model"),
        cell(rate(r.requests_per_second), "rps", true),
        cell(rate(r.prompt_tokens_per_second), "prompt", true),
        cell(rate(r.completion_tokens_per_second), "completion", true),
        cell(seconds(quantile(0.5, d)), "p50", true),
        cell(seconds(quantile(0.95, d)), "p95", true),
        cell(String(d ? d.count : 0), "timed", true),
      ]);
    });
    fillTable("models", rows, "No requests yet");
    return deltas.filter(Boolean).reduce(addHistograms, null);
  }

  // ---- TTFT over the last minute ----------------------------------------------------------

  function noteTtft(ttft) {
    const now = Date.now();
    if (samples.length > 0 && samples[0].process !== ttft.process) samples.length = 0;
    samples.push({ at: now, process: ttft.process, models: new Map(ttft.models.map((m) => [m.model, m])) });
    // Keep the newest reading at least a minute old as the base of the differences.
    while (samples.length > 2 && now - samples[1].at >= WINDOW_MS) samples.shift();
  }

  // The model's histogram between the base reading and the latest; null before two readings.
  function windowed(model) {
    if (samples.length < 2) return null;
    const last = samples[samples.length - 1].models.get(model);
    if (!last) return null;
    const base = samples[0].models.get(model);
    if (!base) return last;
    return {
      count: last.count - base.count,
      sum: last.sum - base.sum,
      buckets: last.buckets.map(([le, n], i) => [le, n - base.buckets[i][1]]),
    };
  }

  function addHistograms(a, b) {
    if (a === null) return b;
    return {
      count: a.count + b.count,
      sum: a.sum + b.sum,
      buckets: a.buckets.map(([le, n], i) => [le, n + b.buckets[i][1]]),
    };
  }

  // Prometheus's histogram_quantile: linear within the bucket the rank falls in.
  function quantile(q, histogram) {
    if (!histogram || histogram.count <= 0) return null;
    const rank = q * histogram.count;
    let lower = 0;
    let below = 0;
    for (const [le, cumulative] of histogram.buckets) {
      if (cumulative >= rank) {
        if (le === null) return lower;
        const share = cumulative > below ? (rank - below) / (cumulative - below) : 0;
        return lower + (le - lower) * share;
      }
      lower = le ?? lower;
      below = cumulative;
    }
    return lower;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
  }

  function rate(value) {
    return value === undefined ? "–" : value.toFixed(2);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#key-form").addEventListener("submit", useKey);
    takeKeyFromFragment();
    poll();
  });
})();
