/* Dataset page, versions card: retrain a job of the previous version with the same settings on this one. */
(function () {
  "use strict";
  const card = document.getElementById("lineage");
  if (!card) return;
  const datasetId = Number(card.dataset.datasetId);
  const error = document.getElementById("retrain-error");
  card.querySelectorAll("button[data-retrain]").forEach((btn) => {
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      Graft.hide(error);
      try {
        const spec = JSON.parse(btn.dataset.retrain);
        const job = await Graft.api("POST", "/api/v1/jobs", Object.assign({}, spec, { dataset_id: datasetId }));
        window.location.href = "/jobs/" + job.id;
      } catch (e) {
        Graft.show(error, e.message);
        btn.disabled = false;
      }
    });
  });
})();
