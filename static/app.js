/* Graft: helpers shared by the pages. Plain JS, no build step. */
"use strict";
const Graft = (() => {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  /* The message of an API error body {"error": {"message": ...}}, or a fallback. */
  function errorMessage(status, text) {
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    if (status === 0) return "The server could not be reached: check that Graft is running and try again.";
    if (status === 401) return "You are signed out: reload the page, or open a new sign-in link.";
    if (status === 413) return "The upload is larger than the server accepts.";
    return `The server answered ${status}${text ? ": " + text.slice(0, 200) : ""}`;
  }

  /* fetch() against the API with the session cookie and the CSRF header; resolves to parsed JSON
     (or null for 204), rejects with an Error whose message is the API's message. A FormData body goes
     as multipart/form-data, anything else as JSON. */
  async function api(method, url, body) {
    const headers = { "X-CSRF-Token": csrf(), "Accept": "application/json" };
    const opts = { method, headers, credentials: "same-origin" };
    if (body instanceof FormData) opts.body = body;  // the browser sets the multipart boundary
    else if (body !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    let resp;
    try { resp = await fetch(url, opts); } catch (e) { throw new Error(errorMessage(0, "")); }
    const text = await resp.text();
    if (!resp.ok) {
      const err = new Error(errorMessage(resp.status, text));
      err.status = resp.status;
      try { err.body = JSON.parse(text); } catch (e) { err.body = null; }
      throw err;
    }
    return text ? JSON.parse(text) : null;
  }

  function show(el, text) { if (!el) return; el.textContent = text; el.hidden = false; }
  function hide(el) { if (el) el.hidden = true; }

  function duration(s) {
    if (s === null || s === undefined || isNaN(s)) return "";
    if (s < 9.95) return `${Math.max(0, s).toFixed(1)} s`;
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  }
  function pct(x, digits = 1) { return x === null || x === undefined ? "" : `${(100 * x).toFixed(digits)}%`; }
  function bytes(n) {
    const units = ["bytes", "KB", "MB", "GB"]; let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} bytes` : `${n.toFixed(1)} ${units[i]}`;
  }

  /* Times are rendered in UTC on the server; show them in the browser's time zone. */
  function localTimes(root = document) {
    root.querySelectorAll("time[datetime]").forEach((t) => {
      const d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) {
        t.title = t.textContent;
        t.textContent = d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric",
                                                      hour: "2-digit", minute: "2-digit" });
      }
    });
  }
  document.addEventListener("DOMContentLoaded", () => localTimes());

  /* The workspace switcher in the top bar submits itself. */
  const wsSelect = document.getElementById("ws-select");
  if (wsSelect) wsSelect.addEventListener("change", () => wsSelect.form.submit());

  /* The words for a job's stage ("decode" -> "Decoding images"): the server's one list (app.web.render.STAGES). */
  const stagesEl = document.getElementById("graft-stages");
  const stages = stagesEl ? JSON.parse(stagesEl.textContent) : {};

  /* The words for a job's state on its progress card. */
  const FINAL = ["succeeded", "failed", "cancelled"];
  function stageText(s) {
    if (s.status === "queued") return "Waiting for a worker";
    if (s.status === "running") return stages[s.stage] || s.stage || "Starting";
    if (s.status === "succeeded") return "Finished";
    return s.status === "cancelled" ? "Cancelled" : "Failed";
  }

  /* Follow job `id`: onUpdate(snapshot) on each progress snapshot, onMessage(text) for each message event,
     onEnd() once the job has ended (the job's server-sent events, or polling without EventSource). */
  function follow(id, onUpdate, onMessage, onEnd) {
    let ended = false;
    const end = () => { if (!ended) { ended = true; onEnd(); } };
    if (typeof EventSource !== "undefined") {
      const es = new EventSource(`/api/v1/jobs/${id}/events`);
      const parse = (e) => { try { return JSON.parse(e.data); } catch (err) { return {}; } };
      es.addEventListener("progress", (e) => onUpdate(parse(e)));
      es.addEventListener("message", (e) => { const d = parse(e); if (d.message) onMessage(d.message); });
      es.addEventListener("end", () => { es.close(); end(); });
      return;
    }
    const poll = async () => {
      try {
        const job = await api("GET", `/api/v1/jobs/${id}`);
        onUpdate(job);
        if (FINAL.includes(job.status)) { end(); return; }
      } catch (e) { /* try again */ }
      setTimeout(poll, 1500);
    };
    poll();
  }

  /* A progress bar (the progressbar macro's markup under `root`) at snapshot `s`. */
  function setBar(root, s) {
    const p = Math.max(0, Math.min(1, s.progress || 0));
    const bar = root.querySelector(".bar");
    const fill = root.querySelector(".bar-fill");
    if (fill) {
      fill.style.width = `${(100 * p).toFixed(1)}%`;
      fill.className = `bar-fill bar-${s.status}`;
    }
    if (bar) bar.setAttribute("aria-valuenow", String(Math.round(100 * p)));
  }

  /* A job's own page (a probe, a label-issue search): `live` follows its progress box (#job-progress, #stage-text,
     #percent-text, #eta-text, #status-badge) and messages (#messages) and reloads the page when it ends; the
     #cancel-btn asks for it to stop. */
  function watchJobPage(id, live) {
    const $ = (x) => document.getElementById(x);
    if (live) {
      const box = $("job-progress");
      const list = $("messages");
      follow(id, (s) => {
        setBar(box, s);
        $("stage-text").textContent = stageText(s);
        $("percent-text").textContent = `${Math.round(100 * Math.max(0, Math.min(1, s.progress || 0)))}%`;
        $("eta-text").textContent = s.status === "running" && s.eta_seconds ? `about ${duration(s.eta_seconds)} left` : "";
        const badge = document.querySelector("#status-badge .badge");
        if (badge && s.status) { badge.className = `badge badge-${s.status}`; badge.textContent = s.status; }
      }, (msg) => {
        const li = document.createElement("li");
        li.textContent = msg;
        list.appendChild(li);
      }, () => setTimeout(() => window.location.reload(), 400));
    }
    const cancel = $("cancel-btn");
    if (cancel) {
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          await api("POST", `/api/v1/jobs/${id}/cancel`);
          cancel.textContent = "Stopping…";
        } catch (e) {
          show($("action-error"), e.message);
          cancel.disabled = false;
        }
      });
    }
  }

  return { csrf, api, errorMessage, show, hide, duration, pct, bytes, localTimes, stages, stageText, follow, setBar,
           watchJobPage };
})();
