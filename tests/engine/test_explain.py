"""Where the model looked: Grad-CAM heatmaps of a real model (pretrained EfficientNet-Lite0 with a head trained on
the frozen features of a slice of hymenoptera), checked on constructed images where the evidence is in a known
place: a real bee photo pasted into one quadrant of a blank canvas."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from support.heads import features, inputs, model_with_head, pick, train_head
from support.paths import HYMENOPTERA

from worker.engine.data import preprocess_image
from worker.engine.explain import decode_png_base64, heatmap, png_base64, to_image_size
from worker.engine.modelfile import save_model_file
from worker.engine.predict import Predictor

CLASSES = ["ants", "bees"]
SIZE = 128


@pytest.fixture(scope="module")
def bees(tmp_path_factory):
    model, pre = model_with_head(2, SIZE)
    paths, labels = pick(HYMENOPTERA / "train", CLASSES, 16)
    train_head(model, features(model, inputs(paths, pre)), labels, steps=200)
    out = tmp_path_factory.mktemp("explain")
    save_model_file(out / "model.pt", model, CLASSES, pre, {"backbone": "efficientnet_lite0"}, {}, "packaged")
    bee = Image.open(sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]).convert("RGB")
    return model, pre, out / "model.pt", bee


def _canvas(bee: Image.Image, size: tuple[int, int], quadrant: tuple[int, int]) -> Image.Image:
    """A light grey canvas with the bee photo filling most of one quadrant (column, row)."""
    w, h = size
    canvas = Image.new("RGB", size, (200, 200, 200))
    qw, qh = w // 2, h // 2
    photo = bee.resize((int(qw * 0.8), int(qh * 0.8)))
    canvas.paste(photo, (quadrant[0] * qw + qw // 10, quadrant[1] * qh + qh // 10))
    return canvas


def _share(heat: np.ndarray, quadrant: tuple[int, int]) -> float:
    h, w = heat.shape
    c, r = quadrant
    return float(heat[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2].sum() / max(heat.sum(), 1e-9))


@pytest.mark.parametrize("quadrant", [(0, 0), (1, 1), (1, 0)])
def test_the_heatmap_peaks_on_the_object(bees, quadrant):
    model, pre, _, bee = bees
    canvas = _canvas(bee, (256, 256), quadrant)
    x = preprocess_image(canvas, pre)
    heat = heatmap(model, x, CLASSES.index("bees"))
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() == pytest.approx(1.0, abs=1e-3)
    # the crop covers the canvas but for a thin border: the map is in crop coordinates, quadrants line up
    assert _share(heat, quadrant) > 0.5  # a quarter when spread evenly
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert (peak[1] >= SIZE // 2) == bool(quadrant[0]) and (peak[0] >= SIZE // 2) == bool(quadrant[1])


def test_predict_with_explain_gives_a_png_at_the_image_size(bees, tmp_path):
    _, _, model_path, bee = bees
    canvas = _canvas(bee, (320, 240), (1, 0))
    canvas.save(tmp_path / "canvas.png")
    pred = Predictor(model_path)
    plain = pred.predict([tmp_path / "canvas.png"])[0]
    assert "heatmap_png" not in plain and plain["abstained"] is False and plain["ood_score"] is None
    with open(tmp_path / "canvas.png", "rb") as f:  # an upload: a binary file, read to its end afterwards
        res = pred.predict_sources([("canvas.png", f), ("bee.jpg", tmp_path / "canvas.png")], explain=True)
    heat = decode_png_base64(res[0]["heatmap_png"])
    assert heat.shape == (240, 320) and heat.dtype == np.uint8
    assert Image.open(io.BytesIO(__import__("base64").b64decode(res[0]["heatmap_png"]))).mode == "L"
    assert _share(heat.astype(float), (1, 0)) > 0.5
    assert res[0]["top"] == plain["top"] and "heatmap_png" in res[1]


def test_the_map_goes_back_where_the_crop_was():
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[:10, :10] = 1.0  # the crop's top-left corner
    # a 200 x 100 image resized to 200 x 100 (short side 100), centre crop 100 x 100 at x = 50
    out = to_image_size(cam, (200, 100), (400, 200))
    assert out.shape == (200, 400)
    assert out[:, :95].max() == 0.0 and out[5:15, 105:115].min() > 0.9 and out[:, 300:].max() == 0.0
    again = decode_png_base64(png_base64(out))
    assert again.shape == (200, 400) and again.max() == 255


@pytest.mark.slow
def test_vit_gets_a_token_heatmap():
    from worker.engine.backbones import build_model

    model = build_model("vit_b_16", 2, pretrained=False, seed=0).eval()
    x = torch.randn(1, 3, 224, 224)
    heat = heatmap(model, x, 1)
    assert heat.shape == (224, 224) and 0.0 <= heat.min() <= heat.max() <= 1.0
