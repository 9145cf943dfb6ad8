"""The job page's exports table: each export's checked figures side by side, and a line against ONNX fp32."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from app.web.jobs import _exports_view
from app.web.render import templates
from domain.results import ExportCheck, RunSummary

ROOT = Path(__file__).resolve().parents[2]


def _check(fmt, ok=True, **kw):
    base = {"format": fmt, "ok": ok, "error": None if ok else f"the {fmt} export drifts from PyTorch",
            "parity": {"images": 20, "max_abs_prob_diff": 0.088, "top1_agreement": 0.95,
                       "decided": 17, "decided_agreement": 1.0, "pixels_max_abs_prob_diff": 0.0015}}
    return {**base, **kw}


SUMMARY = RunSummary.model_validate({"exports": [
    _check("pytorch", parity=None, accuracy=0.8, reference_accuracy=0.8, latency_ms=11.2, size_bytes=13_930_733),
    _check("model_card", parity=None),
    _check("onnx", accuracy=0.75, reference_accuracy=0.8, latency_ms=6.43, size_bytes=13_554_653),
    _check("onnx_int8", accuracy=0.75, reference_accuracy=0.8, latency_ms=4.57, size_bytes=3_937_332),
    _check("onnx_fp16", accuracy=0.75, reference_accuracy=0.8, latency_ms=8.51, size_bytes=6_895_083),
    _check("openvino", ok=False, accuracy=0.5, reference_accuracy=0.8, latency_ms=6.4, size_bytes=12_476_510),
]})


def test_old_stored_checks_still_load():
    old = ExportCheck.model_validate({"format": "onnx", "ok": True, "error": None,
                                      "parity": {"images": 8, "max_abs_prob_diff": 2e-7, "top1_agreement": 1.0}})
    assert old.accuracy is None and old.latency_ms is None and old.size_bytes is None and old.tolerance is None


def test_the_rows_carry_the_figures_and_a_line_against_onnx_fp32():
    rows = {r["format"]: r for r in _exports_view(SUMMARY, {"model", "model_card", "onnx", "onnx_int8",
                                                             "onnx_fp16", "openvino"})}
    assert rows["onnx_int8"]["relative"] == "ONNX int8: 3.4x smaller, 1.4x faster, accuracy +0.0 points"
    assert rows["onnx_fp16"]["relative"] == "ONNX fp16: 2.0x smaller, 1.3x slower, accuracy +0.0 points"
    assert rows["openvino"]["state"] == "failed" and "accuracy -25.0 points" in rows["openvino"]["relative"]
    assert rows["onnx"]["relative"] is None and rows["pytorch"]["relative"] is None
    assert rows["torchscript"]["state"] == "missing" and rows["torchscript"]["figures"] is None
    assert rows["onnx"]["figures"] == {"accuracy": 0.75, "reference_accuracy": 0.8, "latency_ms": 6.43,
                                       "size_bytes": 13_554_653}


def test_the_exports_section_renders_them():
    html = (ROOT / "templates" / "job.html").read_text()
    start = html.index("{% if exports %}\n<section")
    section = html[start:html.index("</section>", start) + len("</section>")] + "\n{% endif %}"
    out = templates.env.from_string(section).render(
        exports=_exports_view(SUMMARY, {"model", "model_card", "onnx", "onnx_int8", "onnx_fp16"}),
        job=SimpleNamespace(id=7))
    int8 = re.search(r'<tr data-format="onnx_int8" data-state="ok">.*?</tr>', out, re.S).group(0)
    assert "75.0%" in int8 and "(PyTorch 80.0%)" in int8 and "4.6 ms" in int8 and "3.8 MB" in int8
    assert "3.4x smaller, 1.4x faster, accuracy +0.0 points" in int8 and "format=onnx_int8" in int8
    ov = re.search(r'<tr data-format="openvino" data-state="failed">.*?</tr>', out, re.S).group(0)
    assert "badge-failed" in ov and "href=" not in ov and "50.0%" in ov
    pt = re.search(r'<tr data-format="pytorch" data-state="ok">.*?</tr>', out, re.S).group(0)
    assert "(network only)" in pt and "PyTorch 80.0%" not in pt
