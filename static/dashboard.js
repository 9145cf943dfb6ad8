/* Dashboard and dataset page: keep the status of unfinished jobs current (polls the API while any job
   on the page is queued or running), and the dataset page's delete button. */
"use strict";
(() => {
  const FINAL = ["succeeded", "failed", "cancelled"];
  const rows = () => Array.from(document.querySelectorAll("table[data-live-jobs] tr[data-job-id]"));

  function update(row, job) {
    row.dataset.status = job.status;
    const badge = row.querySelector('[data-role="badge"]');
    if (badge) { badge.className = `badge badge-${job.status}`; badge.textContent = job.status; }
    const fill = row.querySelector(".bar-fill");
    if (fill) { fill.className = `bar-fill bar-${job.status}`; fill.style.width = `${(100 * job.progress).toFixed(1)}%`; }
    const text = row.querySelector('[data-role="progress-text"]');
    if (text) {
      let t = `${Math.round(100 * job.progress)}%`;
      if (job.status === "running" && job.eta_seconds) t += ` · ${Graft.duration(job.eta_seconds)} left`;
      if (job.status === "queued") t = "waiting";
      if (job.status === "succeeded") t = "done";
      text.textContent = t;
    }
    const acc = row.querySelector('[data-role="acc"]');
    if (acc) acc.textContent = Graft.pct(job.best_val_acc);
  }

  async function poll() {
    const live = rows().filter((r) => !FINAL.includes(r.dataset.status));
    if (!live.length) return;
    try {
      const jobs = await Graft.api("GET", "/api/v1/jobs");
      const byId = new Map(jobs.map((j) => [String(j.id), j]));
      live.forEach((r) => { const j = byId.get(r.dataset.jobId); if (j) update(r, j); });
    } catch (e) { /* keep the last state; try again later */ }
    setTimeout(poll, 3000);
  }
  if (rows().some((r) => !FINAL.includes(r.dataset.status))) setTimeout(poll, 3000);
})();
