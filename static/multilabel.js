/* Job page of a multi-label model: move each label's threshold and see its precision, recall and F1 (and the
   micro and macro F1, and the share of images with every label right) on the val images; editors keep them with
   PUT /api/v1/jobs/{id}/thresholds (used by the API's predictions and written into the model card). */
(() => {
  const el = document.getElementById("ml-data");
  if (!el) return;
  const data = JSON.parse(el.textContent);
  const $ = (id) => document.getElementById(id);
  const rows = [...document.querySelectorAll("#label-table tbody tr")];
  const save = $("ml-thresholds-save");
  const scores = data.scores || [], masks = data.y_true || [];
  const f1 = (tp, fp, fn) => (tp ? (2 * tp) / (2 * tp + fp + fn) : 0);
  const thresholds = () => rows.map((r) => Number(r.querySelector(".ml-threshold").value));

  function recompute() {
    const th = thresholds();
    rows.forEach((r, c) => { r.querySelector(".ml-threshold-text").textContent = th[c].toFixed(2); });
    if (!scores.length || scores.length !== masks.length) return;  // no per-image scores stored
    const n = data.classes.length, tp = Array(n).fill(0), fp = Array(n).fill(0), fn = Array(n).fill(0);
    let exact = 0;
    scores.forEach((p, i) => {
      let all = true;
      for (let c = 0; c < n; c++) {
        const given = p[c] >= th[c] - 1e-12, has = ((masks[i] >> c) & 1) === 1;
        if (given && has) tp[c]++; else if (given) fp[c]++; else if (has) fn[c]++;
        if (given !== has) all = false;
      }
      if (all) exact++;
    });
    const f1s = [];
    rows.forEach((r, c) => {
      r.querySelector(".ml-p").textContent = (tp[c] + fp[c] ? tp[c] / (tp[c] + fp[c]) : 0).toFixed(3);
      r.querySelector(".ml-r").textContent = (tp[c] + fn[c] ? tp[c] / (tp[c] + fn[c]) : 0).toFixed(3);
      r.querySelector(".ml-f1").textContent = f1(tp[c], fp[c], fn[c]).toFixed(3);
      r.querySelector(".ml-counts").textContent = `${tp[c]} / ${fp[c]} / ${fn[c]}`;
      if (tp[c] + fn[c]) f1s.push(f1(tp[c], fp[c], fn[c]));
    });
    const sum = (a) => a.reduce((x, y) => x + y, 0);
    $("ml-micro-f1").textContent = f1(sum(tp), sum(fp), sum(fn)).toFixed(3);
    $("ml-macro-f1").textContent = (f1s.length ? sum(f1s) / f1s.length : 0).toFixed(3);
    $("ml-subset").textContent = `${(100 * exact / scores.length).toFixed(1)}%`;
  }

  rows.forEach((r) => r.querySelector(".ml-threshold").addEventListener("input", () => {
    recompute();
    if (save) save.disabled = false;
  }));
  if (save) save.addEventListener("click", async () => {
    save.disabled = true;
    Graft.hide($("ml-thresholds-error"));
    const th = thresholds(), body = { thresholds: {} };
    data.classes.forEach((c, i) => { body.thresholds[c] = th[i]; });
    try {
      const out = await Graft.api("PUT", `/api/v1/jobs/${data.job_id}/thresholds`, body);
      $("ml-thresholds-note").textContent = `Set by ${out.set_by}; predictions through the API use them.`;
    } catch (e) {
      Graft.show($("ml-thresholds-error"), e.message);
      save.disabled = false;
    }
  });
})();
