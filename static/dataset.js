/* Dataset page: delete the dataset. */
"use strict";
(() => {
  const btn = document.getElementById("delete-dataset");
  if (!btn) return;
  btn.addEventListener("click", async () => {
    if (!confirm(`Delete the dataset "${btn.dataset.name}" and its images from the server?`)) return;
    btn.disabled = true;
    try {
      await Graft.api("DELETE", `/api/v1/datasets/${btn.dataset.id}`);
      window.location.href = "/";
    } catch (e) {
      Graft.show(document.getElementById("delete-error"), e.message);
      btn.disabled = false;
    }
  });
})();
