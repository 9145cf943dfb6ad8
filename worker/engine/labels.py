"""Wrong labels: which images are probably filed under the wrong class.

`find_label_issues(data_dir, spec)`: the frozen features of every image, train and val (computed by the
runner, so cached under the same keys as a probe or a `features` run with the same settings: whichever comes
first computes them, the others read them), then, for each of `folds` stratified folds of the images, a
linear classifier (probe.fit_linear_probe, L2 chosen once by cross-validation on all images) fitted on the
other folds gives the held-out images' class probabilities (a train image's averaged over its augmented
views). Confident learning (cleanlab.filter.find_label_issues, pruning by the estimated noise rates) on those
out-of-fold probabilities picks the suspects; a suspect's score is 1 - cleanlab's label quality score
(`spec.rank_by`, self-confidence by default: 1 - the out-of-fold probability of the given class).

Besides, two images filed under different classes that are the same picture, byte for byte (exact_duplicate)
or nearly (cosine similarity of their features >= `spec.duplicate_threshold`: near_duplicate), make the one
the classifiers believe less a suspect, with the other as `other_file` and the other's class suggested; its
score is 0.5 + half its confident-learning score, so such pairs rank high.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from domain.callbacks import CallbackList, Callbacks
from domain.errors import DataError, RunStopped
from domain.layout import discover
from domain.results import LabelIssue, LabelIssueReport
from domain.spec import LabelIssueSpec, RunSpec

from .backbones import get_info
from .probe import ProgressWindow, feature_runner, fit_linear_probe, stratified_folds
from .progress import Progress

log = logging.getLogger(__name__)

SPANS = {"decode": (0.0, 0.3), "features": (0.3, 0.9), "folds": (0.9, 0.97), "duplicates": (0.97, 1.0)}
SIM_BLOCK = 1024  # rows of the similarity matrix computed at a time


@dataclass
class ImageFeatures:
    """Every readable image of a run's split, train then val, with its feature rows (a train image has one
    row per augmented view, a val image one row)."""

    paths: list[Path]
    files: list[str]  # relative to the dataset folder
    splits: list[str]  # "train" | "val"
    labels: list[int]
    x: torch.Tensor  # [rows, features]
    groups: torch.Tensor  # [rows]: the image of each row

    @classmethod
    def from_runner(cls, r) -> ImageFeatures:
        nt, nv = len(r.train_labels), len(r.val_labels)
        index = list(r.train_idx) + list(r.val_idx)
        views = len(r.train_feats)
        return cls(paths=[r.items[i][0] for i in index], files=[Path(r.split.rel(r.items[i][0])).as_posix()
                                                                for i in index],
                   splits=["train"] * nt + ["val"] * nv, labels=list(r.train_labels) + list(r.val_labels),
                   x=torch.cat([*r.train_feats, r.val_feats]),
                   groups=torch.cat([torch.arange(nt)] * views + [nt + torch.arange(nv)]))

    def embeddings(self) -> torch.Tensor:
        """One unit vector per image: the mean of its rows, centered on the mean image (pooled features are
        non-negative, so uncentered any two images look alike: cosine 0.85-0.94 between different photos of
        sign_language_digits, 0.55-0.83 centered), normalized."""
        x = self.x.double()
        n = torch.zeros(len(self.labels), dtype=torch.float64).index_add_(0, self.groups, torch.ones(len(x),
                                                                                                   dtype=torch.float64))
        mean = torch.zeros(len(self.labels), x.shape[1], dtype=torch.float64).index_add_(0, self.groups, x)
        mean /= n.clamp_min(1)[:, None]
        return torch.nn.functional.normalize(mean - mean.mean(0), dim=1).float()


# ---------------------------------------------------------------- out-of-fold probabilities


def out_of_fold_probs(x: torch.Tensor, groups: torch.Tensor, labels: list[int], classes: int, folds: int,
                      seed: int, on_fold: Callable[[int, int], None] | None = None
                      ) -> tuple[np.ndarray, float, int]:
    """(probabilities [images, classes] of each image from a linear classifier fitted on the other folds, the
    L2 strength used, the number of folds). Rows of one image (`groups`) are never split across folds; an
    image's probabilities are the mean over its rows. The L2 strength is chosen once, by fit_linear_probe's
    cross-validation on every row."""
    n = len(labels)
    y_img = torch.tensor(labels)
    y = y_img[groups]
    k = max(2, min(folds, n))
    if on_fold:
        on_fold(0, k + 1)
    l2 = fit_linear_probe(x, y, classes, groups, seed=seed).l2
    fold_of_image = torch.tensor(stratified_folds(labels, k, seed))
    row_fold = fold_of_image[groups]
    probs = torch.zeros(n, classes, dtype=torch.float64)
    rows = torch.zeros(n, dtype=torch.float64)
    for f in range(k):
        if on_fold:
            on_fold(f + 1, k + 1)
        tr, te = row_fold != f, row_fold == f
        if not bool(te.any()):
            continue
        lp = fit_linear_probe(x[tr], y[tr], classes, groups[tr], seed=seed, l2_grid=(l2,))
        p = lp.logits(x[te]).double().softmax(1)
        probs.index_add_(0, groups[te], p)
        rows.index_add_(0, groups[te], torch.ones(len(p), dtype=torch.float64))
    if on_fold:
        on_fold(k + 1, k + 1)
    return (probs / rows.clamp_min(1)[:, None]).numpy(), l2, k


# ---------------------------------------------------------------- duplicates filed under different classes


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def exact_duplicate_pairs(paths: list[Path], labels: list[int]) -> list[tuple[int, int]]:
    """(i, j), i < j, of byte-identical files with different labels."""
    by: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            by.setdefault(file_hash(p), []).append(i)
        except OSError as e:  # gone since it was decoded: nothing to compare
            log.warning("could not read %s: %s", p, e)
    return [(a, b) for ids in by.values() if len(ids) > 1 for ai, a in enumerate(ids) for b in ids[ai + 1:]
            if labels[a] != labels[b]]


def near_duplicate_pairs(emb: torch.Tensor, labels: list[int], threshold: float, device: torch.device | str = "cpu",
                         on_block: Callable[[int, int], None] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity), i < j: for each image, its most similar image of another class when the
    similarity reaches `threshold` (each pair once)."""
    n = len(labels)
    e = emb.to(device)
    lab = torch.tensor(labels, device=e.device)
    best: dict[tuple[int, int], float] = {}
    for a in range(0, n, SIM_BLOCK):
        b = min(n, a + SIM_BLOCK)
        s = e[a:b] @ e.T
        s.masked_fill_(lab[a:b, None] == lab[None, :], -2.0)  # same class (the image itself included)
        sim, j = s.max(1)
        for i in (sim >= threshold).nonzero().flatten().tolist():
            pair = (min(a + i, int(j[i])), max(a + i, int(j[i])))
            best[pair] = max(best.get(pair, -1.0), float(sim[i]))
        if on_block:
            on_block(b, n)
    return [(i, j, s) for (i, j), s in sorted(best.items())]


# ---------------------------------------------------------------- the suspects


def rank_issues(feats: ImageFeatures, probs: np.ndarray, classes: list[str], rank_by: str,
                exact: list[tuple[int, int]], near: list[tuple[int, int, float]]) -> list[LabelIssue]:
    """Confident learning's suspects and the duplicates' ones, one entry per image, most likely wrong first."""
    from cleanlab.filter import find_label_issues as cl_find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(feats.labels)
    quality = get_label_quality_scores(y, probs, method=rank_by)
    flagged = cl_find_label_issues(y, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by=rank_by,
                                   n_jobs=1)
    others = probs.copy()
    others[np.arange(len(y)), y] = -1.0
    best_other = others.argmax(1)

    def issue(i: int, suggested: int, score: float, reason: str, **extra) -> LabelIssue:
        return LabelIssue(file=feats.files[i], given=classes[y[i]], suggested=classes[suggested],
                          score=round(float(min(1.0, max(0.0, score))), 6), reason=reason, split=feats.splits[i],
                          given_probability=round(float(probs[i, y[i]]), 6),
                          suggested_probability=round(float(probs[i, suggested]), 6), **extra)

    out: dict[int, LabelIssue] = {}
    order = {}
    for n, i in enumerate(flagged.tolist()):
        out[i] = issue(i, int(best_other[i]), 1.0 - float(quality[i]), "confident_learning")
        order[i] = n
    pairs = [(i, j, 1.0, "exact_duplicate") for i, j in exact]
    seen = {(i, j) for i, j in exact}
    pairs += [(i, j, s, "near_duplicate") for i, j, s in near if (i, j) not in seen]
    for i, j, sim, reason in sorted(pairs, key=lambda t: -t[2]):
        # the suspect: the one whose given class the classifiers believe less
        sus, other = (i, j) if probs[i, y[i]] <= probs[j, y[j]] else (j, i)
        if sus in out and out[sus].other_file is not None:
            continue  # already paired, with a more similar image
        score = 0.5 + 0.5 * (1.0 - float(quality[sus]))
        out[sus] = issue(sus, int(y[other]), score, reason, other_file=feats.files[other],
                         similarity=round(min(1.0, sim), 6))
    big = len(order)
    ranked = sorted(out.items(), key=lambda kv: (-kv[1].score, order.get(kv[0], big), kv[1].file))
    return [it for _, it in ranked]


# ---------------------------------------------------------------- the whole search


def _run_spec(spec: LabelIssueSpec) -> RunSpec:
    """The feature settings of a probe of the same backbone (probe.probe_backbone), hence its cache keys."""
    info = get_info(spec.backbone)  # UnknownBackbone, with the list of names
    return RunSpec(backbone=spec.backbone, pretrained=True, strategy="features", epochs=1,
                   image_size=None if info.fixed_size else spec.image_size, augment=spec.augment,
                   feature_views=spec.feature_views, val_fraction=spec.val_fraction, batch_size=spec.batch_size,
                   seed=spec.seed)


MULTILABEL_REFUSAL = ("the search for wrong labels works on one class per image (folder layouts), not on a "
                      "multi-label labels.csv yet: review the validation images with a missed or a false label on a "
                      "trained job's page instead")


def find_label_issues(data_dir: str | Path, spec: LabelIssueSpec | None = None, cache_dir: str | Path | None = None,
                      callbacks: Callbacks | None = None, device: str | None = None,
                      max_pixels: int | None = None) -> LabelIssueReport:
    """The images of `data_dir` (train and val) whose labels are probably wrong, most likely first (at most
    `spec.max_issues`). A problem with the data raises DataError, missing weights WeightsUnavailable, an
    unknown backbone UnknownBackbone, all before any image is decoded; `callbacks.should_stop()` stops it
    (status "stopped", no issues)."""
    from .device import pick_device

    spec = spec or LabelIssueSpec()
    t0 = time.perf_counter()
    cb = CallbackList(callbacks)
    rs = _run_spec(spec)
    split = discover(Path(data_dir), spec.val_fraction, spec.seed)  # DataError before any model is built
    if split.multilabel:
        raise DataError(MULTILABEL_REFUSAL)
    dev = pick_device(device)
    cb.on_start({"classes": split.classes, "counts": split.counts(), "layout": split.layout, "device": str(dev),
                 "phases": ["label_issues"], "epochs": 0, "warnings": split.warnings})
    for w in split.warnings:
        cb.on_message(w)
    report = LabelIssueReport(status="completed", classes=split.classes, counts=split.counts(), layout=split.layout,
                              n_classes=len(split.classes), method=f"confident_learning:{spec.rank_by}",
                              backbone=spec.backbone, device=str(dev), warnings=list(split.warnings))
    window = ProgressWindow(cb, t0)
    window.window(0.0, 1.0, SPANS)
    r = feature_runner(rs, Path(data_dir), window, cache_dir, device, max_pixels)
    try:
        r.prepare()
        progress = Progress(r.cb, t0, 0)
        tf = time.perf_counter()
        cb.on_message(f"{spec.backbone}: features of every image")
        r.compute_features(progress)
        report.feature_seconds = round(time.perf_counter() - tf, 3)
        report.cached, report.image_size, report.skipped = bool(r.features_from_cache), r.pre.image_size, r.skipped
        feats = ImageFeatures.from_runner(r)
        report.n_images = len(feats.labels)
        classes = list(r.classes)
        tk = time.perf_counter()
        probs, report.l2, report.folds = out_of_fold_probs(
            feats.x, feats.groups, feats.labels, len(classes), spec.folds, spec.seed,
            lambda d, n: progress("folds", 0, d, n, tk))
        report.oof_acc = round(float((probs.argmax(1) == np.asarray(feats.labels)).mean()), 6)
        cb.on_message(f"out-of-fold accuracy {100 * report.oof_acc:.1f}% over {report.folds} folds "
                      f"({time.perf_counter() - tk:.1f} s)")
        td = time.perf_counter()
        exact = exact_duplicate_pairs(feats.paths, feats.labels)
        near = near_duplicate_pairs(feats.embeddings(), feats.labels, spec.duplicate_threshold, r.device,
                                    lambda d, n: progress("duplicates", 0, d, n, td))
        issues = rank_issues(feats, probs, classes, spec.rank_by, exact, near)
        report.n_flagged = len(issues)
        report.issues = issues[:spec.max_issues]
        cb.on_message(f"{len(issues)} suspect label(s) among {report.n_images} images "
                      f"({len(exact)} exact and {len(near)} near duplicate pair(s) across classes)")
    except RunStopped:
        report.status, report.issues, report.n_flagged = "stopped", [], 0
    finally:
        del r
        gc.collect()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report
