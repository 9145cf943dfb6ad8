"""The model card's `input` and `usage` sections: what the exported graphs take, and how to run each format."""
from __future__ import annotations

import json

from domain.exports import EXPORT_FORMATS

_IMAGE = ('image = np.asarray(ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB"))[None]'
          '  # uint8, 1 x H x W x 3, any size')

_PY: dict[str, tuple[str, str]] = {
    "onnx": ("pip install onnxruntime numpy pillow", """import json
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

sess = ort.InferenceSession("{file}")
card = json.loads(sess.get_modelmeta().custom_metadata_map["graft.model_card"])
{image}
logits, probabilities = sess.run(["logits", "probabilities"], {{"image": image}})
top = int(probabilities[0].argmax())
print(card["classes"][top], float(probabilities[0][top]))
"""),
    "openvino": ("pip install openvino numpy pillow", """import json
import zipfile
import numpy as np
import openvino as ov
from PIL import Image, ImageOps

zipfile.ZipFile("{file}").extractall("graft_model")  # model.xml, model.bin, model_card.json
card = json.load(open("graft_model/model_card.json"))
# f32: on CPUs with bfloat16, OpenVINO computes in bfloat16 by default (less exact than the checked figures)
model = ov.Core().compile_model("graft_model/model.xml", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})
{image}
probabilities = model({{"image": image}})["probabilities"]
top = int(probabilities[0].argmax())
print(card["classes"][top], float(probabilities[0][top]))
"""),
    "torchscript": ("pip install torch numpy pillow", """import json
import numpy as np
import torch
from PIL import Image, ImageOps

extra = {{"model_card.json": ""}}
model = torch.jit.load("{file}", _extra_files=extra)
card = json.loads(extra["model_card.json"])
{image}
with torch.inference_mode():
    logits, probabilities = model(torch.from_numpy(image.copy()))
top = int(probabilities[0].argmax())
print(card["classes"][top], float(probabilities[0][top]))
"""),
    "pytorch": ("pip install graft[worker] (Graft's own code)", """from worker.engine.predict import Predictor

print(Predictor("{file}").predict(["photo.jpg"]))  # or on the command line: graft predict {file} photo.jpg
"""),
}

_BROWSER = """<script src="https://cdn.jsdelivr.net/npm/onnxruntime-web/dist/ort.min.js"></script>
<script>
const CLASSES = {classes};
async function classify(img) {{  // a loaded <img> element (same origin, or served with CORS)
  const session = await ort.InferenceSession.create("{file}");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const rgb = new Uint8Array(canvas.width * canvas.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4) {{ rgb[j++] = rgba[i]; rgb[j++] = rgba[i + 1]; rgb[j++] = rgba[i + 2]; }}
  const image = new ort.Tensor("uint8", rgb, [1, canvas.height, canvas.width, 3]);
  const {{ probabilities }} = await session.run({{ image }});
  const p = Array.from(probabilities.data);
  const top = p.indexOf(Math.max(...p));
  return {{ label: CLASSES[top], probability: p[top] }};
}}
</script>
"""


def input_section(pre: dict) -> dict:
    """What every exported graph takes (TorchScript, ONNX fp32/fp16/int8, OpenVINO)."""
    size, resize = pre["image_size"], pre["resize_size"]
    interp = "bicubic (a = -0.5)" if pre.get("interpolation") == "bicubic" else "bilinear"
    return {
        "name": "image", "dtype": "uint8", "layout": "NHWC, RGB", "shape": ["batch", "height", "width", 3],
        "size": "any height and width (one size per batch; batch 1 for images of different sizes)",
        "preprocessing": "inside the graph: give the decoded image's pixels as they are",
        "graph_does": [
            f"resize so that the short side is {resize} pixels (the long side round(long * {resize} / short)), "
            f"{interp}, antialiased as Pillow resizes, rounded to whole pixel values",
            f"center crop {size} x {size}",
            f"pixels / 255, then (x - mean) / std with mean {list(pre['mean'])} and std {list(pre['std'])}",
            "the network, then logits / temperature (`logits`) and their softmax (`probabilities`)",
        ],
        "decode": "decode with EXIF orientation applied, as Graft does (Pillow: ImageOps.exif_transpose); Graft "
                  "decodes big JPEGs at a reduced scale first, so its answers can differ slightly (see each "
                  "export's measured agreement)",
        "pytorch": "the `pytorch` file (model.pt) takes normalized float32 NCHW tensors instead: use Graft's "
                   "Predictor, which does this preprocessing",
    }


def usage_section(card: dict) -> dict:
    """Per format: what to install, a minimal Python program, and for ONNX a browser one (onnxruntime-web)."""
    out: dict[str, dict] = {}
    for name, f in EXPORT_FORMATS.items():
        key = "onnx" if name.startswith("onnx") else name
        if key not in _PY:
            continue
        install, code = _PY[key]
        entry = {"file": f.file, "install": install, "python": code.format(file=f.file, image=_IMAGE)}
        if key == "onnx":
            entry["browser"] = _BROWSER.format(file=f.file, classes=json.dumps(card.get("classes", [])))
            entry["browser_note"] = ("onnxruntime-web runs the same graph (WebAssembly); the canvas gives the "
                                     "image's pixels undecorated, so nothing else is needed")
        out[name] = entry
    return out
