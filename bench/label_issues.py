#!/usr/bin/env python3
"""How well `graft label-issues` finds wrong labels: a real dataset with a known share of its labels made wrong
(images moved to another, random class folder, seeded), the finder run on it, and the precision of its top-k
suspects (k = the number of labels made wrong: precision@k = recall@k), of everything it flagged, and the
recall of what it flagged.

    .venv/bin/python bench/label_issues.py [--data ../shared/datasets/sign_language_digits] [--per-class N]
        [--flip 0.05] [--seed 0] [--image-size 128] [--feature-views 2] [--augment light] [--folds 5]
        [--rank-by self_confidence] [--device cpu|cuda] [--repeat 1]

DATA: class folders only (<class>/*), or train/ + val/ (both splits flipped). Prints one JSON line. The
features are computed cold (a fresh cache), then the run is repeated with the cached features (`--repeat`)
to show what a second search costs.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import DATASETS, IMAGE_EXTS, command_line, cpu_name, gpu_note, loadavg, python_speed  # noqa: E402


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def noisy_copy(src: Path, dst: Path, per_class: int | None, fraction: float, seed: int) -> dict:
    """Copy `src` (at most `per_class` images per class and split, seeded) into `dst`, with round(fraction *
    images) of them, drawn at random, put in the folder of another class drawn at random. Returns the flipped
    files (relative to dst) with their true class."""
    rng = random.Random(seed)
    splits = [s for s in ("train", "val") if (src / s).is_dir()] or [""]
    files: list[tuple[str, str, Path]] = []  # (split, class, source)
    classes = sorted(p.name for p in (src / splits[0]).iterdir() if p.is_dir() and not p.name.startswith("."))
    for s in splits:
        for c in classes:
            imgs = _images(src / s / c) if (src / s / c).is_dir() else []
            pick = imgs if per_class is None or per_class >= len(imgs) else sorted(rng.sample(imgs, per_class))
            files += [(s, c, p) for p in pick]
    n_flip = round(fraction * len(files))
    flip = set(rng.sample(range(len(files)), n_flip))
    flipped = {}
    for i, (s, c, p) in enumerate(files):
        given = rng.choice([x for x in classes if x != c]) if i in flip else c
        rel = (Path(s) / given / p.name).as_posix() if s else f"{given}/{p.name}"
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
        if i in flip:
            flipped[rel] = c
    return {"images": len(files), "classes": len(classes), "flipped": flipped}


def score(report, flipped: dict[str, str]) -> dict:
    k = len(flipped)
    files = [i.file for i in report.issues]
    hits = [f in flipped for f in files]
    right_class = sum(1 for i in report.issues[:k] if i.file in flipped and i.suggested == flipped[i.file])
    return {"k": k, "precision_at_k": round(sum(hits[:k]) / max(1, k), 4), "recall_at_k": round(sum(hits[:k]) / max(1, k), 4),
            "flagged": len(files), "precision_flagged": round(sum(hits) / max(1, len(files)), 4),
            "recall_flagged": round(sum(hits) / max(1, k), 4),
            "suggested_right_at_k": round(right_class / max(1, sum(hits[:k])), 4),
            "chance_precision": round(k / max(1, report.n_images), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATASETS / "sign_language_digits")
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--feature-views", type=int, default=None)
    ap.add_argument("--augment", default=None)
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--rank-by", default=None)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="Runs after the first, on the cached features.")
    args = ap.parse_args()

    from domain.spec import LabelIssueSpec
    from worker.engine.device import pick_device
    from worker.engine.labels import find_label_issues

    opts = {k: v for k, v in {"image_size": args.image_size, "feature_views": args.feature_views,
                              "augment": args.augment, "folds": args.folds, "rank_by": args.rank_by,
                              "backbone": args.backbone}.items() if v is not None}
    spec = LabelIssueSpec(seed=args.seed, max_issues=100_000, **opts)
    speed = python_speed()
    with tempfile.TemporaryDirectory(prefix="graft-labels-") as tmp:
        data = Path(tmp) / "data"
        made = noisy_copy(args.data, data, args.per_class, args.flip, args.seed)
        runs = []
        for _ in range(1 + args.repeat):
            t = time.perf_counter()
            rep = find_label_issues(data, spec, cache_dir=Path(tmp) / "cache", device=args.device)
            wall = time.perf_counter() - t
            runs.append({"seconds": round(wall, 2), "feature_seconds": rep.feature_seconds, "cached": rep.cached,
                         **score(rep, made["flipped"])})
        by_reason: dict[str, int] = {}
        for i in rep.issues:
            by_reason[i.reason] = by_reason.get(i.reason, 0) + 1
    out = {"bench": "label_issues", "command": command_line(), "data": str(args.data.name),
           "images": rep.n_images, "classes": rep.n_classes, "flip": args.flip, "flipped": len(made["flipped"]),
           "spec": spec.model_dump(), "image_size": rep.image_size, "folds": rep.folds, "l2": rep.l2,
           "oof_acc": rep.oof_acc, "method": rep.method, "by_reason": by_reason, **runs[0],
           "cached_runs": runs[1:], "device": str(pick_device(args.device)), "gpu": gpu_note(str(pick_device(args.device))),
           "cpu": cpu_name(), "loadavg": loadavg(), "python_loop_s": round(speed, 3)}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
