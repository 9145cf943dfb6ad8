/* Label issues: start a search from the dataset page or the review page; on the review page, follow a running
   search (reload when it ends), then decide per suspect (accept the suggestion, pick another class, remove
   the image, or keep it) with the buttons or the keys, and apply the choices as a new version of the dataset. */
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);

  /* ---------------------------------------------------------------- start a search (dataset page, review page) */
  const start = $("label-start");
  if (start) {
    start.addEventListener("click", async () => {
      const did = start.dataset.datasetId;
      const errBox = $("label-error") || $("action-error");
      Graft.hide(errBox);
      start.disabled = true;
      try {
        await Graft.api("POST", `/api/v1/datasets/${did}/label-issues`, {});
        window.location.href = `/datasets/${did}/label-issues`;
      } catch (e) {
        // 409: one is under way already; 503: saved, but the queue is unreachable (sent later): follow it there
        const saved = e.body && e.body.error && e.body.error.details && e.body.error.details.job_id;
        if (saved) { window.location.href = `/datasets/${did}/label-issues`; return; }
        Graft.show(errBox, e.message);
        start.disabled = false;
      }
    });
  }

  const dataEl = $("label-issues-data");
  if (!dataEl) return;
  const data = JSON.parse(dataEl.textContent);

  /* ---------------------------------------------------------------- a running search */
  if (data.job_id && !data.final) {
    Graft.watchJobPage(data.job_id, true);
  }

  /* ---------------------------------------------------------------- the review */
  const grid = $("issue-grid");
  const apply = $("apply-btn");
  if (!grid || !apply || !data.can_edit) return;
  const cards = Array.from(grid.querySelectorAll("article.issue"));
  const issues = data.issues;
  const classes = data.classes;
  // per card: "keep", "remove", or the class it is given
  const choice = cards.map(() => "keep");
  let current = 0;

  function changes() {
    const relabel = {};
    const remove = [];
    choice.forEach((c, i) => {
      if (c === "remove") remove.push(issues[i].file);
      else if (c !== "keep") relabel[issues[i].file] = c;
    });
    return { relabel, remove };
  }

  function refresh() {
    const { relabel, remove } = changes();
    const n = Object.keys(relabel).length + remove.length;
    apply.textContent = `Apply ${n} change${n === 1 ? "" : "s"}`;
    apply.disabled = n === 0;
    const parts = [];
    if (Object.keys(relabel).length) parts.push(`${Object.keys(relabel).length} relabelled`);
    if (remove.length) parts.push(`${remove.length} removed`);
    $("apply-summary").textContent = n
      ? `${parts.join(", ")}: makes a new version of the dataset; this one stays as it is.`
      : "Makes a new version of the dataset with the images relabelled and removed; this one stays as it is.";
  }

  function decide(i, c) {
    const it = issues[i];
    if (c === it.given) c = "keep";
    choice[i] = c;
    const card = cards[i];
    card.dataset.choice = c === "keep" || c === "remove" ? c : "relabel";
    const select = card.querySelector('select[data-act="pick"]');
    if (select) select.value = c === "keep" || c === "remove" ? it.given : c;
    const text = card.querySelector('[data-role="choice"]');
    if (text) {
      text.textContent = c === "keep" ? `Undecided: kept as ${it.given}`
        : c === "remove" ? "Removed from the new version" : `Relabelled: ${it.given} → ${c}`;
    }
    refresh();
  }

  function focusCard(i) {
    if (!cards.length) return;
    current = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, n) => { c.tabIndex = n === current ? 0 : -1; });
    cards[current].focus();
  }

  cards.forEach((card, i) => {
    card.addEventListener("focusin", () => {
      current = i;
      cards.forEach((c, n) => { c.tabIndex = n === i ? 0 : -1; });
    });
    card.addEventListener("click", (e) => {
      const act = e.target.closest("[data-act]");
      if (!act || act.tagName === "SELECT") return;
      if (act.dataset.act === "accept") decide(i, issues[i].suggested);
      else if (act.dataset.act === "remove") decide(i, "remove");
      else if (act.dataset.act === "keep") decide(i, "keep");
    });
    const select = card.querySelector('select[data-act="pick"]');
    if (select) select.addEventListener("change", () => decide(i, select.value));
  });

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || !cards.length) return;
    const tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    // space on a button presses it; on a card or the page it keeps the image
    const onCard = e.target === document.body || (e.target && e.target.matches && e.target.matches("article.issue"));
    const key = e.key;
    let handled = true;
    if (key === "ArrowRight" || key === "ArrowDown" || key === "j") focusCard(current + 1);
    else if (key === "ArrowLeft" || key === "ArrowUp" || key === "k") focusCard(current - 1);
    else if (key === "a") decide(current, issues[current].suggested);
    else if (key === "x" || key === "Delete") decide(current, "remove");
    else if (key === "0" || (key === " " && onCard)) decide(current, "keep");
    else if (/^[1-9]$/.test(key) && Number(key) <= classes.length) decide(current, classes[Number(key) - 1]);
    else handled = false;
    if (handled) e.preventDefault();
  });

  apply.addEventListener("click", async () => {
    const body = changes();
    Graft.hide($("apply-error"));
    apply.disabled = true;
    apply.textContent = "Applying…";
    try {
      const version = await Graft.api("POST", `/api/v1/datasets/${data.dataset_id}/versions`, body);
      window.location.href = `/datasets/${version.id}`;
    } catch (e) {
      Graft.show($("apply-error"), e.message);
      refresh();
    }
  });
  refresh();
})();
