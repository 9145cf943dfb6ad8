/* Backbone comparison: start it from the dataset page, follow its progress there or on its job page (the
   job's server-sent events, or polling without EventSource), reload to show the leaderboard when it ends;
   cancel and delete on the job page. */
"use strict";
(() => {
  const { stageText, follow, setBar } = Graft;
  const $ = (id) => document.getElementById(id);

  /* ---------------------------------------------------------------- dataset page */
  const card = $("probe");
  if (card) {
    const btn = $("probe-start");
    const box = $("probe-progress");
    const status = $("probe-status");
    const errBox = $("probe-error");
    const watch = (id) => {
      box.hidden = false;
      btn.disabled = true;
      const link = ` (job ${id})`;
      let last = "";
      follow(id, (s) => {
        setBar(box, s);
        const eta = s.status === "running" && s.eta_seconds ? `, about ${Graft.duration(s.eta_seconds)} left` : "";
        status.textContent = `${stageText(s)}${eta}${last ? ": " + last : ""}${link}`;
        if (s.status === "failed" && s.error) Graft.show(errBox, s.error);
      }, (msg) => { last = msg; }, () => setTimeout(() => window.location.reload(), 400));
    };
    if (card.dataset.jobId) watch(card.dataset.jobId);
    btn.addEventListener("click", async () => {
      Graft.hide(errBox);
      btn.disabled = true;
      try {
        const job = await Graft.api("POST", `/api/v1/datasets/${card.dataset.datasetId}/probe`, {});
        const empty = $("probe-empty");
        if (empty) empty.hidden = true;
        status.textContent = "Waiting for a worker";
        watch(job.id);
      } catch (e) {
        // 409: one is under way already; 503: saved, but the queue is unreachable (it is sent later): follow it
        const saved = e.body && e.body.error && e.body.error.details && e.body.error.details.job_id;
        if (e.status !== 409) Graft.show(errBox, e.message);
        if (saved) { watch(saved); return; }
        btn.disabled = false;
      }
    });
  }

  /* ---------------------------------------------------------------- probe job page */
  const dataEl = $("probe-job-data");
  if (dataEl) {
    const data = JSON.parse(dataEl.textContent);
    Graft.watchJobPage(data.id, !data.final);
    const del = $("delete-job");
    if (del) {
      del.addEventListener("click", async () => {
        if (!confirm(`Delete this comparison (job ${data.id})?`)) return;
        del.disabled = true;
        try {
          await Graft.api("DELETE", `/api/v1/jobs/${data.id}`);
          window.location.href = `/datasets/${data.dataset_id}`;
        } catch (e) {
          Graft.show($("action-error"), e.message);
          del.disabled = false;
        }
      });
    }
  }
})();
