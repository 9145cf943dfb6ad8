/* Compare page: the val accuracy and val loss of every job, overlaid (one colour per job, the same in the
   table's header swatches). The data comes from the page's JSON block. */
"use strict";
(() => {
  const el = document.getElementById("compare-data");
  if (!el) return;
  const data = JSON.parse(el.textContent);
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];
  const color = (i) => COLORS[i % COLORS.length];
  document.querySelectorAll(".swatch[data-series]").forEach((s) => {
    s.style.background = color(Number(s.dataset.series));
  });
  if (typeof Chart === "undefined") return;

  const last = (j) => (j.curves.length ? j.curves[j.curves.length - 1].epoch : 0);
  const epochs = Math.max(1, ...data.jobs.map(last));
  const labels = Array.from({ length: epochs }, (_, i) => i + 1);

  function chart(id, key, percent) {
    const canvas = document.getElementById(id);
    if (!canvas) return null;
    const datasets = data.jobs.map((j, i) => {
      const byEpoch = new Map(j.curves.map((m) => [m.epoch, m]));
      return {
        label: `job #${j.id}${j.id === data.baseline_id ? " (baseline)" : ""}`,
        data: labels.map((e) => (byEpoch.has(e) ? (percent ? 100 : 1) * byEpoch.get(e)[key] : null)),
        borderColor: color(i), backgroundColor: color(i), borderDash: i === 0 ? [] : [6, 3],
        tension: 0.2, pointRadius: 3, pointHoverRadius: 5, borderWidth: 2, spanGaps: true,
      };
    });
    return new Chart(canvas, {
      type: "line",
      data: { labels, datasets },
      options: {
        responsive: true, maintainAspectRatio: false, animation: { duration: 250 },
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { title: { display: true, text: "epoch" }, grid: { display: false } },
          y: { title: { display: true, text: percent ? "val accuracy" : "val loss" }, beginAtZero: percent,
               max: percent ? 100 : undefined, ticks: percent ? { callback: (v) => `${v}%` } : {} },
        },
        plugins: {
          legend: { position: "bottom", labels: { usePointStyle: true, pointStyle: "circle", boxWidth: 8, boxHeight: 8 } },
          tooltip: { callbacks: { label: (c) => (c.parsed.y === null ? "" :
            `${c.dataset.label}: ${percent ? c.parsed.y.toFixed(1) + "%" : c.parsed.y.toFixed(4)}`) } },
        },
      },
    });
  }
  chart("cmp-acc-chart", "val_acc", true);
  chart("cmp-loss-chart", "val_loss", false);
})();
