/* Job page, calibration card: the coverage-accuracy curve of the val images, and moving the operating point
   (PUT /api/v1/jobs/{id}/operating-point). */
"use strict";
(() => {
  const el = document.getElementById("trust-data");
  if (!el) return;
  const data = JSON.parse(el.textContent);
  const $ = (id) => document.getElementById(id);
  const range = $("threshold-range"), save = $("threshold-save"), effect = $("threshold-effect");
  const curve = data.curve || [];
  const at = (t) => {  // the curve's point for a threshold: the nearest at or below it
    let p = curve[0];
    for (const q of curve) if (q.threshold <= t + 1e-12) p = q;
    return p;
  };
  let chart = null;
  if (typeof Chart !== "undefined" && $("coverage-chart") && curve.length) {
    chart = new Chart($("coverage-chart"), {
      type: "scatter",
      data: { datasets: [
        { label: "val images", data: curve.map((p) => ({ x: 100 * p.coverage, y: 100 * (p.accuracy_when_answered || 0) })),
          showLine: true, borderColor: "#2563eb", backgroundColor: "#2563eb", pointRadius: 0, borderWidth: 2 },
        { label: "operating point", data: [], borderColor: "#ea580c", backgroundColor: "#ea580c", pointRadius: 6 },
      ] },
      options: { responsive: true, maintainAspectRatio: false, animation: false,
        scales: { x: { title: { display: true, text: "answered (coverage, %)" }, min: 0, max: 100 },
                  y: { title: { display: true, text: "right when answered (%)" }, max: 100 } },
        plugins: { legend: { position: "bottom" } } },
    });
  }
  function show(t) {
    const p = at(t);
    $("threshold-text").textContent = t.toFixed(2);
    if (!p) return;
    const junk = data.junk;  // images of no class: the share still answered at this threshold
    const accepted = junk ? junk.accepted.filter((c) => c >= t - 1e-12).length / junk.images : null;
    effect.textContent = `At ${t.toFixed(2)}: answers ${(100 * p.coverage).toFixed(1)}% of the val images, ` +
      `${(100 * (p.accuracy_when_answered || 0)).toFixed(1)}% of them right` +
      (junk ? `; answers ${(100 * accepted).toFixed(1)}% of the ${junk.images} images of no class.` : ".");
    if (chart) {
      chart.data.datasets[1].data = [{ x: 100 * p.coverage, y: 100 * (p.accuracy_when_answered || 0) }];
      chart.update();
    }
  }
  show(Number(data.threshold));
  if (range) range.addEventListener("input", () => { show(Number(range.value)); if (save) save.disabled = false; });
  if (save) save.addEventListener("click", async () => {
    save.disabled = true;
    Graft.hide($("threshold-error"));
    try {
      const op = await Graft.api("PUT", `/api/v1/jobs/${data.job_id}/operating-point`,
                                 { confidence_threshold: Number(range.value) });
      $("trust-coverage").textContent = `${(100 * op.coverage).toFixed(1)}%`;
      $("trust-accuracy").textContent = `${(100 * op.accuracy_when_answered).toFixed(1)}%`;
      $("threshold-note").textContent = `Set by ${op.set_by}; training chose ${Number(op.default_threshold).toFixed(2)}.`;
    } catch (e) {
      Graft.show($("threshold-error"), e.message);
      save.disabled = false;
    }
  });
})();

/* Job page, mistakes gallery: where the model looked for its (wrong) answer, from the inference service
   (POST /api/v1/jobs/{id}/predict?explain=true on the gallery's thumbnails), as an overlay on each image. */
(() => {
  const btn = document.getElementById("mistakes-explain");
  if (!btn) return;
  const page = JSON.parse(document.getElementById("job-data").textContent);
  const jobId = page.id;
  const err = document.getElementById("mistakes-explain-error");
  btn.addEventListener("click", async () => {
    btn.disabled = true;
    Graft.hide(err);
    const imgs = [...document.querySelectorAll("#mistakes-gallery img")].slice(0, page.max_predict_images || 64);
    try {
      const form = new FormData();
      for (const [i, img] of imgs.entries()) {
        const r = await fetch(img.src, { credentials: "same-origin" });
        if (!r.ok) throw new Error(`image ${i + 1} could not be read (status ${r.status})`);
        form.append("files", await r.blob(), `mistake${i}.jpg`);
      }
      form.append("top_k", "1");
      const body = await Graft.api("POST", `/api/v1/jobs/${jobId}/predict?explain=true`, form);
      body.results.forEach((res, i) => {
        if (!res.heatmap_png || !imgs[i]) return;
        const heat = document.createElement("img");
        heat.className = "try-heat";
        heat.alt = "Where the model looked";
        heat.src = `data:image/png;base64,${res.heatmap_png}`;
        imgs[i].parentElement.appendChild(heat);
      });
      btn.textContent = "Heatmaps shown";
    } catch (e) {
      Graft.show(err, e.message);
      btn.disabled = false;
    }
  });
})();
