/* Dashboard: tick jobs and press "Compare selected". The button stays disabled, with a message that says
   why, until 2 to 8 succeeded jobs of one dataset are ticked; the first ticked is the baseline. */
"use strict";
(() => {
  const form = document.getElementById("compare-form");
  if (!form) return;
  const MAX = 8;
  const btn = document.getElementById("compare-btn");
  const hint = document.getElementById("compare-hint");
  const first = hint.textContent;
  const boxes = () => Array.from(document.querySelectorAll('input[type="checkbox"][form="compare-form"]'));
  let order = [];  // ticked job ids, in the order they were ticked

  function picked() {
    const ticked = new Map(boxes().filter((b) => b.checked).map((b) => [b.value, b]));
    order = order.filter((id) => ticked.has(id));
    ticked.forEach((_, id) => { if (!order.includes(id)) order.push(id); });
    return order.map((id) => ticked.get(id));
  }

  function check() {
    const sel = picked();
    const status = (b) => (b.closest("tr") || {dataset: {}}).dataset.status;
    const unfinished = sel.filter((b) => status(b) !== "succeeded");
    const datasets = new Set(sel.map((b) => b.dataset.dataset));
    let msg, ok = false;
    if (!sel.length) msg = first;
    else if (unfinished.length) {
      const which = unfinished.map((b) => `#${b.value} (${status(b)})`).join(", ");
      msg = `Only succeeded jobs have val results to compare: untick ${which}.`;
    } else if (datasets.size > 1) msg = "These jobs were trained on different datasets: tick jobs of one dataset.";
    else if (sel.length < 2) {
      msg = `Tick at least one more succeeded job of the same dataset to compare with #${sel[0].value}.`;
    }
    else if (sel.length > MAX) msg = `At most ${MAX} jobs can be compared at once: untick ${sel.length - MAX}.`;
    else { ok = true; msg = `Compare ${sel.length} jobs; #${sel[0].value}, ticked first, is the baseline.`; }
    btn.disabled = !ok;
    hint.textContent = msg;
    return sel;
  }

  document.addEventListener("change", (e) => {
    if (e.target.matches && e.target.matches('input[type="checkbox"][form="compare-form"]')) check();
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const sel = check();
    if (!btn.disabled) window.location.assign(`/compare?ids=${sel.map((b) => b.value).join(",")}`);
  });
  // the dashboard updates the status of running jobs as they finish
  const table = document.querySelector("table[data-live-jobs]");
  if (table && window.MutationObserver) {
    new MutationObserver(check).observe(table, { subtree: true, attributes: true, attributeFilter: ["data-status"] });
  }
  check();
})();
