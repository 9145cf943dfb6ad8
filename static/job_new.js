/* New-job page: keep the form consistent (backbones without weights, strategy-specific fields) and
   submit it as JSON to POST /api/v1/jobs. */
"use strict";
(() => {
  const form = document.getElementById("job-form");
  const errBox = document.getElementById("job-error");
  const submit = document.getElementById("job-submit");
  const pretrained = document.getElementById("pretrained");
  const lrInput = form.elements.lr;
  const lrHelp = document.getElementById("lr-help");
  const headField = document.getElementById("head-epochs-field");
  const defaultsLr = JSON.parse(lrInput.dataset.defaults || "{}");

  const strategyKind = () => (form.querySelector('input[name="strategy"]:checked') || {}).value || "features";
  const backboneRadios = () => Array.from(form.querySelectorAll('input[name="backbone"]'));

  function syncBackbones() {
    backboneRadios().forEach((r) => {
      const off = pretrained.checked && r.dataset.available !== "yes";
      r.disabled = off;
      r.closest(".choice").classList.toggle("choice-unavailable", off);
      if (off && r.checked) r.checked = false;
    });
    if (!backboneRadios().some((r) => r.checked)) {
      const first = backboneRadios().find((r) => !r.disabled);
      if (first) first.checked = true;
    }
  }

  function syncStrategy() {
    const kind = strategyKind();
    const lr = defaultsLr[kind];
    lrHelp.textContent = lr ? `Leave empty for the default of this strategy (${lr}; 10× that with SGD).`
      : "Leave empty for the strategy's default.";
    headField.hidden = kind !== "two_stage";
  }

  pretrained.addEventListener("change", syncBackbones);
  form.querySelectorAll('input[name="strategy"]').forEach((r) => r.addEventListener("change", syncStrategy));
  syncBackbones();
  syncStrategy();

  const num = (el) => (el.value.trim() === "" ? null : Number(el.value));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    Graft.hide(errBox);
    const backbone = (form.querySelector('input[name="backbone"]:checked') || {}).value;
    if (!backbone) {
      Graft.show(errBox, "Pick a backbone. If none can be picked, import pretrained weights (graft weights import) or untick \"Start from ImageNet weights\".");
      return;
    }
    let strategy = strategyKind();
    if (strategy === "finetune_last") strategy = `finetune_last:${form.elements.finetune_n.value || 2}`;
    const body = {
      dataset_id: Number(form.dataset.datasetId),
      backbone,
      pretrained: pretrained.checked,
      strategy,
      epochs: num(form.elements.epochs),
      batch_size: num(form.elements.batch_size),
      augment: form.elements.augment.value,
      patience: num(form.elements.patience),
    };
    const lr = num(lrInput);
    if (lr !== null) body.lr = lr;
    if (strategy === "two_stage" && num(form.elements.head_epochs) !== null) body.head_epochs = num(form.elements.head_epochs);
    if (num(form.elements.search_trials) !== null) body.search = { trials: num(form.elements.search_trials) };
    if (body.epochs === null) { Graft.show(errBox, "Enter the number of epochs."); return; }
    if (body.batch_size === null) delete body.batch_size;

    submit.disabled = true;
    submit.textContent = "Starting…";
    try {
      const job = await Graft.api("POST", "/api/v1/jobs", body);
      window.location.href = `/jobs/${job.id}`;
    } catch (err) {
      Graft.show(errBox, err.message);
      const saved = err.body && err.body.error && err.body.error.details && err.body.error.details.job_id;
      if (saved) {  // saved but not sent to the queue (503): it stays queued; offer its page
        const a = document.createElement("a");
        a.href = `/jobs/${saved}`;
        a.textContent = ` Open job ${saved}.`;
        errBox.appendChild(a);
      }
      submit.disabled = false;
      submit.textContent = "Start training";
      errBox.scrollIntoView({ behavior: "smooth", block: "center" });
    }
  });
})();
