/* The training job page's "Batch predict" card: send a zip of images, follow each batch job (its status and
   progress), cancel one, and link its results (CSV, sorted zip) when it has succeeded. */
"use strict";
(() => {
  const card = document.getElementById("batch-predict");
  if (!card) return;
  const jobId = card.dataset.jobId;
  const $ = (id) => document.getElementById(id);
  const table = $("batch-runs");
  const errBox = $("batch-error");
  const FINAL = ["succeeded", "failed", "cancelled"];

  function links(id) {
    return `<a href="/api/v1/jobs/${id}/results.csv" download>CSV</a> · ` +
      `<a href="/api/v1/jobs/${id}/results.zip" download>sorted zip</a>`;
  }

  function render(row, s) {
    row.dataset.status = s.status;
    const status = row.querySelector(".batch-status");
    let text = s.status;
    if (s.status === "running") {
      text += ` (${Math.floor(100 * (s.progress || 0))}%`;
      if (s.total_epochs) text += `, ${s.current_epoch} of ${s.total_epochs} images`;
      if (s.eta_seconds) text += `, about ${Graft.duration(s.eta_seconds)} left`;
      text += ")";
    }
    if (s.status === "failed" && s.error) text += `: ${s.error}`;
    status.textContent = text;
    const cell = row.querySelector(".batch-links");
    if (s.status === "succeeded") cell.innerHTML = links(row.dataset.batchId);
    else if (FINAL.includes(s.status)) cell.textContent = "";
  }

  function watch(row) {
    const id = row.dataset.batchId;
    Graft.follow(id, (s) => render(row, s), () => {}, async () => {
      try { render(row, await Graft.api("GET", `/api/v1/jobs/${id}`)); } catch (e) { /* the row keeps its text */ }
    });
  }

  function addRow(job) {
    const row = document.createElement("tr");
    row.dataset.batchId = job.id;
    row.dataset.status = job.status;
    row.innerHTML = `<td>#${job.id}</td><td class="batch-status"></td><td class="num"></td>` +
      `<td class="batch-links"><button type="button" class="button button-small batch-cancel">Cancel</button></td>`;
    row.children[2].textContent = job.spec && job.spec.images ? job.spec.images : "";
    row.querySelector(".batch-status").textContent = job.status;
    table.tBodies[0].prepend(row);
    table.hidden = false;
    watch(row);
  }

  table.addEventListener("click", async (e) => {
    const btn = e.target.closest(".batch-cancel");
    if (!btn) return;
    const row = btn.closest("tr");
    btn.disabled = true;
    Graft.hide(errBox);
    try { render(row, await Graft.api("POST", `/api/v1/jobs/${row.dataset.batchId}/cancel`)); }
    catch (err) { Graft.show(errBox, err.message); btn.disabled = false; }
  });

  table.querySelectorAll("tbody tr").forEach((row) => {
    if (!FINAL.includes(row.dataset.status)) watch(row);
  });

  const form = $("batch-form");
  if (!form) return;
  const input = $("batch-file");
  const start = $("batch-start");
  input.addEventListener("change", () => {
    const f = input.files[0];
    $("batch-file-name").textContent = f ? `${f.name} (${Graft.bytes(f.size)})` : "no file chosen";
    start.disabled = !f;
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = input.files[0];
    if (!f) return;
    Graft.hide(errBox);
    start.disabled = true;
    start.textContent = "Sending…";
    const body = new FormData();
    body.append("file", f, f.name);
    try {
      addRow(await Graft.api("POST", `/api/v1/jobs/${jobId}/batch-predict`, body));
      input.value = "";
      $("batch-file-name").textContent = "no file chosen";
    } catch (err) {
      Graft.show(errBox, err.message);
      start.disabled = false;
    }
    start.textContent = "Predict";
  });
})();
