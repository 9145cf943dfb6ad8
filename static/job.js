/* Job page: live progress, charts and epoch table from the job's server-sent events; cancel; delete. */
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("job-data").textContent);
  const FINAL = ["succeeded", "failed", "cancelled"];
  const STAGES = Graft.stages;
  const $ = (id) => document.getElementById(id);
  const seen = new Set();

  /* ---------------------------------------------------------------- charts */
  const charts = {};
  function makeChart(id, yLabel, percent) {
    const canvas = $(id);
    if (!canvas || typeof Chart === "undefined") return null;
    const line = (label, color, dash) => ({ label, data: [], borderColor: color, backgroundColor: color,
      borderDash: dash, tension: 0.2, pointRadius: 3, pointHoverRadius: 5, borderWidth: 2 });
    return new Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: [line("train", "#2563eb", []), line("val", "#ea580c", [6, 3])] },
      options: {
        responsive: true, maintainAspectRatio: false, animation: { duration: 250 },
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { title: { display: true, text: "epoch" }, grid: { display: false } },
          y: { title: { display: true, text: yLabel }, beginAtZero: percent, max: percent ? 100 : undefined,
               ticks: percent ? { callback: (v) => `${v}%` } : {} },
        },
        plugins: {
          legend: { position: "bottom", labels: { usePointStyle: true, pointStyle: "circle", boxWidth: 8, boxHeight: 8 } },
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${percent ? c.parsed.y.toFixed(1) + "%" : c.parsed.y.toFixed(4)}` } },
        },
      },
    });
  }
  charts.loss = makeChart("loss-chart", "loss", false);
  charts.acc = makeChart("acc-chart", "accuracy", true);

  function chartPoint(m) {
    if (charts.loss) {
      charts.loss.data.labels.push(m.epoch);
      charts.loss.data.datasets[0].data.push(m.train_loss);
      charts.loss.data.datasets[1].data.push(m.val_loss);
    }
    if (charts.acc) {
      charts.acc.data.labels.push(m.epoch);
      charts.acc.data.datasets[0].data.push(100 * m.train_acc);
      charts.acc.data.datasets[1].data.push(100 * m.val_acc);
    }
  }
  function redraw() { Object.values(charts).forEach((c) => c && c.update()); }

  /* ---------------------------------------------------------------- epoch table */
  function tableRow(m) {
    const tr = document.createElement("tr");
    tr.dataset.epoch = m.epoch;
    if (m.is_best) {
      document.querySelectorAll("#epoch-table tr.best").forEach((r) => {
        r.classList.remove("best");
        r.cells[0].textContent = r.dataset.epoch;
      });
      tr.className = "best";
    }
    const cells = [`${m.epoch}${m.is_best ? " ★" : ""}`, m.phase, m.train_loss.toFixed(4), Graft.pct(m.train_acc),
      m.val_loss.toFixed(4), Graft.pct(m.val_acc), m.lr.toExponential(2), m.images_per_s.toFixed(1),
      Graft.duration(m.seconds)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i !== 1) td.className = "num";
      tr.appendChild(td);
    });
    document.querySelector("#epoch-table tbody").appendChild(tr);
  }

  function addEpoch(m, live) {
    if (seen.has(m.epoch)) return;
    seen.add(m.epoch);
    chartPoint(m);
    if (live) {
      tableRow(m);
      $("no-epochs").hidden = true;
      document.querySelectorAll(".chart-empty").forEach((p) => (p.hidden = true));
      redraw();
    }
  }
  data.metrics.forEach((m) => addEpoch(m, false));
  redraw();

  /* ---------------------------------------------------------------- the parameter search (a run with spec.search) */
  function searchCharts(search) {
    if (!search || typeof Chart === "undefined") return;
    const trials = (search.trials || []).filter((t) => t.val_loss !== null && t.val_loss !== undefined);
    const colour = (t) => (t.number === search.best_trial ? "#16a34a" : t.state === "pruned" ? "#9ca3af" : "#2563eb");
    const trialLabel = (t) => `trial ${t.number} (${t.state}${t.number === search.best_trial ? ", best" : ""})`;
    const legend = { display: false };
    // a log axis labelled at the powers of ten only (1e-5, 1e-4, ...)
    const logTicks = { callback: (v) => {
      const e = Math.log10(v);
      return Math.abs(e - Math.round(e)) < 1e-6 ? `1e${Math.round(e)}` : "";
    }, autoSkip: false, maxRotation: 0 };
    const byLr = $("search-lr-chart");
    if (byLr && trials.length) {
      new Chart(byLr, {
        type: "scatter",
        data: { datasets: [{ label: "val loss", data: trials.map((t) => ({ x: t.params.lr, y: t.val_loss, t })),
          pointBackgroundColor: trials.map(colour), pointBorderColor: trials.map(colour), pointRadius: 5 }] },
        options: {
          responsive: true, maintainAspectRatio: false, animation: false,
          scales: { x: { type: "logarithmic", ticks: logTicks, title: { display: true, text: "learning rate (log)" } },
                    y: { title: { display: true, text: "best val loss" } } },
          plugins: { legend, tooltip: { callbacks: { label: (c) =>
            `${trialLabel(c.raw.t)}: lr ${c.raw.x.toExponential(2)}, val loss ${c.raw.y.toFixed(4)}` } } },
        },
      });
    }
    const perTrial = $("search-trial-chart");
    if (perTrial && trials.length) {
      new Chart(perTrial, {
        type: "scatter",
        data: { datasets: [
          { label: "val loss", yAxisID: "y", data: trials.map((t) => ({ x: t.number, y: t.val_loss, t })),
            pointBackgroundColor: trials.map(colour), pointBorderColor: trials.map(colour), pointRadius: 5 },
          { label: "val accuracy", yAxisID: "acc", data: trials.map((t) => ({ x: t.number, y: 100 * t.val_acc, t })),
            pointStyle: "triangle", borderColor: "#ea580c", backgroundColor: "#ea580c", pointRadius: 5 },
        ] },
        options: {
          responsive: true, maintainAspectRatio: false, animation: false,
          scales: { x: { title: { display: true, text: "trial" }, ticks: { precision: 0 } },
                    y: { title: { display: true, text: "best val loss" } },
                    acc: { position: "right", min: 0, max: 100, grid: { display: false },
                           title: { display: true, text: "val accuracy" }, ticks: { callback: (v) => `${v}%` } } },
          plugins: { legend: { position: "bottom" }, tooltip: { callbacks: { label: (c) => `${trialLabel(c.raw.t)}: ` +
            (c.dataset.yAxisID === "acc" ? `val acc ${c.raw.y.toFixed(1)}%` : `val loss ${c.raw.y.toFixed(4)}`) } } },
        },
      });
    }
    document.querySelectorAll(".lr-find-chart").forEach((canvas) => {
      const rt = (search.lr_find || [])[Number(canvas.dataset.index)];
      if (!rt || !rt.lrs.length) return;
      // the chosen rate on the curve: the smoothed loss at the nearest step
      let near = 0;
      rt.lrs.forEach((lr, i) => { if (Math.abs(Math.log(lr / rt.lr)) < Math.abs(Math.log(rt.lrs[near] / rt.lr))) near = i; });
      new Chart(canvas, {
        type: "scatter",
        data: { datasets: [
          { label: "smoothed loss", data: rt.lrs.map((x, i) => ({ x, y: rt.losses[i] })), showLine: true,
            borderColor: "#2563eb", backgroundColor: "#2563eb", pointRadius: 0, borderWidth: 2 },
          { label: `chosen lr ${rt.lr.toExponential(2)}`, data: [{ x: rt.lr, y: rt.losses[near] }],
            borderColor: "#16a34a", backgroundColor: "#16a34a", pointRadius: 7, pointStyle: "rectRot" },
        ] },
        options: {
          responsive: true, maintainAspectRatio: false, animation: false,
          scales: { x: { type: "logarithmic", ticks: logTicks, title: { display: true, text: "learning rate (log)" } },
                    y: { title: { display: true, text: "training loss (smoothed)" } } },
          plugins: { legend: { position: "bottom" }, tooltip: { callbacks: { label: (c) =>
            `lr ${c.raw.x.toExponential(2)}: loss ${c.raw.y.toFixed(4)}` } } },
        },
      });
    });
  }
  searchCharts(data.search);

  /* ---------------------------------------------------------------- status and progress */
  function setStatus(status) {
    const badge = document.querySelector("#status-badge .badge");
    if (badge) { badge.className = `badge badge-${status}`; badge.textContent = status; }
    const fill = document.querySelector("#job-progress .bar-fill");
    if (fill) fill.className = `bar-fill bar-${status}`;
    if (FINAL.includes(status) && $("cancel-btn")) $("cancel-btn").hidden = true;
    if (status !== "queued" && $("queued-hint")) $("queued-hint").hidden = true;
  }

  function onProgress(s) {
    setStatus(s.status);
    const p = Math.max(0, Math.min(1, s.progress || 0));
    const fill = document.querySelector("#job-progress .bar-fill");
    if (fill) fill.style.width = `${(100 * p).toFixed(1)}%`;
    const bar = document.querySelector("#job-progress .bar");
    if (bar) bar.setAttribute("aria-valuenow", String(Math.round(100 * p)));
    // 100% only when it is done: a running job at 99.6% still has work left
    $("percent-text").textContent = `${s.status === "succeeded" ? 100 : Math.floor(100 * p)}%`;
    let stage = "Stopped";
    if (s.status === "queued") stage = "Waiting for a worker";
    else if (s.status === "running") stage = STAGES[s.stage] || s.stage || "Starting";
    else if (s.status === "succeeded") stage = "Finished";
    $("stage-text").textContent = stage;
    $("epoch-text").textContent = s.total_epochs ? `epoch ${s.current_epoch} of ${s.total_epochs}` : "";
    // a running job whose worker stopped responding: say so instead of an ETA that no longer means anything
    const eta = $("eta-text");
    const stale = s.status === "running" && s.stale && s.status_note;
    eta.classList.toggle("status-note", Boolean(stale));
    if (stale) eta.setAttribute("role", "status"); else eta.removeAttribute("role");
    eta.textContent = stale ? s.status_note
      : s.status === "running" && s.eta_seconds !== null && s.eta_seconds !== undefined
        ? `about ${Graft.duration(s.eta_seconds)} left` : "";
    if (s.best_val_acc !== null && s.best_val_acc !== undefined) $("best-acc").textContent = Graft.pct(s.best_val_acc);
    if (s.status === "failed" && s.error) {
      $("job-error-text").textContent = s.error;
      $("job-error-box").hidden = false;
    }
  }

  function addMessage(text) {
    const li = document.createElement("li");
    li.textContent = text;
    $("messages").appendChild(li);
  }

  /* ---------------------------------------------------------------- live events */
  if (!data.final && typeof EventSource !== "undefined") {
    const es = new EventSource(`/api/v1/jobs/${data.id}/events`);
    const parse = (e) => { try { return JSON.parse(e.data); } catch (err) { return {}; } };
    es.addEventListener("epoch", (e) => addEpoch(parse(e), true));
    es.addEventListener("progress", (e) => onProgress(parse(e)));
    es.addEventListener("status", (e) => { const d = parse(e); if (d.status) setStatus(d.status); });
    es.addEventListener("message", (e) => { const d = parse(e); if (d.message) addMessage(d.message); });
    es.addEventListener("end", () => {
      es.close();
      // show the final state (report, download link) as the server renders it; the reloaded page is
      // final and opens no stream, so this happens once
      setTimeout(() => window.location.reload(), 400);
    });
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        Graft.show($("action-error"), "Live updates stopped (signed out or the server went away): reload the page.");
      }
    };
  }

  /* ---------------------------------------------------------------- actions */
  const cancel = $("cancel-btn");
  if (cancel) cancel.addEventListener("click", async () => {
    if (!confirm("Cancel this job? A running job stops within a few seconds; its progress is lost.")) return;
    cancel.disabled = true;
    Graft.hide($("action-error"));
    try {
      const job = await Graft.api("POST", `/api/v1/jobs/${data.id}/cancel`);
      setStatus(job.status);
      if (!FINAL.includes(job.status)) { $("stage-text").textContent = "Stopping…"; cancel.textContent = "Stopping…"; }
    } catch (e) {
      Graft.show($("action-error"), e.message);
      cancel.disabled = false;
    }
  });

  /* ---------------------------------------------------------------- try it: classify dropped images */
  const tryZone = $("try-drop");
  if (tryZone) {
    const input = $("try-files");
    const results = $("try-results");
    const tryError = $("try-error");
    const maxImages = data.max_predict_images || 64;
    const IMAGE_EXT = /\.(jpe?g|png|webp|bmp|gif|tiff?)$/i;
    let urls = [];
    let busy = false;

    const el = (tag, cls, text) => {
      const e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text !== undefined) e.textContent = text;
      return e;
    };

    function card(file, preview) {
      const li = el("li", "try-item");
      const img = el("img", "try-preview");
      img.alt = file.name;
      if (preview) {
        const url = URL.createObjectURL(file);
        urls.push(url);
        img.src = url;
        img.addEventListener("error", () => img.classList.add("no-preview"));  // e.g. TIFF: the server reads it
      } else img.classList.add("no-preview");
      const body = el("div", "try-body");
      body.appendChild(el("div", "try-name", file.name));
      const out = el("div", "try-out muted small", "Classifying…");
      body.appendChild(out);
      const fig = el("span", "try-figure");
      fig.appendChild(img);
      li.append(fig, body);
      results.appendChild(li);
      out.figure = fig;  // where a heatmap goes (explain)
      return out;
    }

    function showHeatmap(fig, png) {
      if (!fig || !png) return;
      const heat = el("img", "try-heat");
      heat.alt = "Where the model looked (brighter: more evidence for its answer)";
      heat.src = `data:image/png;base64,${png}`;
      fig.appendChild(heat);
    }

    function showResult(out, r) {
      out.textContent = "";
      out.className = "try-out";
      if (!r || r.error || !Array.isArray(r.top)) {
        out.classList.add("try-fail");
        out.textContent = r && r.error ? r.error : "No answer for this image.";
        return;
      }
      r.top.forEach((t, i) => {
        const row = el("div", `prob-row${i === 0 ? " prob-top" : ""}`);
        row.appendChild(el("span", "prob-class", t["class"]));
        const bar = el("span", "prob-bar");
        const fill = el("span", "prob-fill");
        fill.style.width = `${Math.max(0, Math.min(100, 100 * t.probability)).toFixed(1)}%`;
        bar.appendChild(fill);
        row.appendChild(bar);
        row.appendChild(el("span", "prob-num", Graft.pct(t.probability)));
        out.appendChild(row);
      });
      if (r.abstained) {
        out.prepend(el("div", "try-abstained", `None of these: ${r.abstain_reason || "not sure enough"}`));
      }
      if (Array.isArray(r.labels)) {  // a multi-label model: the labels at or above their thresholds
        out.prepend(el("div", "try-labels", r.labels.length
          ? `Labels: ${r.labels.map((t) => t["class"]).join(", ")}` : "No label (none reaches its threshold)"));
      }
      showHeatmap(out.figure, r.heatmap_png);
    }

    async function classify(fileList) {
      if (busy) return;
      const files = Array.from(fileList || []);
      if (!files.length) return;
      Graft.hide(tryError);
      const isImage = (f) => (f.type || "").startsWith("image/") || IMAGE_EXT.test(f.name);
      const images = files.filter(isImage);
      busy = true;
      tryZone.classList.add("busy");
      urls.forEach((u) => URL.revokeObjectURL(u));
      urls = [];
      results.textContent = "";
      const notes = [];
      const outs = images.map((f) => card(f, true));
      files.filter((f) => !isImage(f)).forEach((f) => {  // said per file, not sent
        showResult(card(f, false), { error: "Not an image (JPEG, PNG, WebP, BMP, GIF or TIFF): left out." });
      });
      try {
        for (let s = 0; s < images.length; s += maxImages) {  // the server takes maxImages per request
          const form = new FormData();
          images.slice(s, s + maxImages).forEach((f) => form.append("files", f, f.name));
          form.append("top_k", "3");
          let body;
          try {
            const explain = $("try-explain") && $("try-explain").checked ? "?explain=true" : "";
            body = await Graft.api("POST", `/api/v1/jobs/${data.id}/predict${explain}`, form);
          } catch (e) {
            notes.push(e.message);
            outs.slice(s).forEach((o) => { o.className = "try-out try-fail"; o.textContent = "Not classified."; });
            break;
          }
          body.results.forEach((r, i) => showResult(outs[s + i], r));
        }
      } finally {
        if (notes.length) Graft.show(tryError, notes.join(" "));
        busy = false;
        tryZone.classList.remove("busy");
      }
    }

    input.addEventListener("change", () => { classify(input.files); input.value = ""; });
    tryZone.addEventListener("keydown", (e) => {
      if (e.target === tryZone && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); input.click(); }
    });
    ["dragenter", "dragover"].forEach((t) => tryZone.addEventListener(t, (e) => {
      e.preventDefault(); tryZone.classList.add("dragover");
    }));
    ["dragleave", "drop"].forEach((t) => tryZone.addEventListener(t, () => tryZone.classList.remove("dragover")));
    tryZone.addEventListener("drop", (e) => { e.preventDefault(); classify(e.dataTransfer && e.dataTransfer.files); });
    // an image dropped next to the zone must not replace the page
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
  }

  const del = $("delete-job");
  if (del) del.addEventListener("click", async () => {
    if (!confirm("Delete this job, its metrics and its model file?")) return;
    del.disabled = true;
    try {
      await Graft.api("DELETE", `/api/v1/jobs/${data.id}`);
      window.location.href = "/";
    } catch (e) {
      Graft.show($("action-error"), e.message);
      del.disabled = false;
    }
  });
})();
