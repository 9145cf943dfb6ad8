"""A real multi-label dataset built from real photos: each image is a 2x2 grid of tiles, each tile an ant or a
bee photo (hymenoptera), a hand sign (sign_language_digits) or plain grey; the image's labels are the kinds of
photo it shows (none for four grey tiles). Written with its labels.csv (header file,labels[,split])."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image

from support.paths import HYMENOPTERA, SHARED

LABELS = ("ant", "bee", "hand")
TILE = 48


def _sources() -> dict[str, list[Path]]:
    hands = sorted(p for d in sorted((SHARED / "sign_language_digits").iterdir()) if d.is_dir()
                   for p in sorted(d.iterdir())[:8])
    return {"ant": sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg")),
            "bee": sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg")), "hand": hands}


def build(dst: Path, n_images: int = 60, seed: int = 0, with_split: bool = False, tile: int = TILE,
          rates: dict[str, float] | None = None) -> Path:
    """`n_images` grid images under dst/images/ and dst/labels.csv; returns dst. Each label is on about half
    of the images (or its share in `rates`); every tenth image has no label."""
    rate = {lbl: 0.5 for lbl in LABELS} | (rates or {})
    rng = random.Random(seed)
    src = _sources()
    used = {k: 0 for k in LABELS}
    (dst / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        labels = set() if i % 10 == 9 else {lbl for lbl in LABELS if rng.random() < rate[lbl]} or {
            rng.choice([lbl for lbl in LABELS if rate[lbl] >= 0.5] or list(LABELS))}
        kinds = sorted(labels) + ["grey"] * (4 - len(labels))
        kinds += [rng.choice(sorted(labels))] if labels and len(kinds) < 4 else []
        kinds = kinds[:4]
        rng.shuffle(kinds)
        img = Image.new("RGB", (2 * tile, 2 * tile), (128, 128, 128))
        for t, kind in enumerate(kinds):
            if kind == "grey":
                continue
            path = src[kind][used[kind] % len(src[kind])]
            used[kind] += 1
            with Image.open(path) as im:
                img.paste(im.convert("RGB").resize((tile, tile)), ((t % 2) * tile, (t // 2) * tile))
        name = f"images/{i:04d}.jpg"
        img.save(dst / name, quality=90)
        split = ("val" if i % 4 == 3 else "train") if with_split else None
        rows.append([name, ";".join(sorted(labels))] + ([split] if with_split else []))
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "labels"] + (["split"] if with_split else []))
        w.writerows(rows)
    return dst
