"""Backbone leaderboard and strategy advisor.

`probe(data_dir, ...)`: for each backbone, the frozen features of the val images and of the augmented train
views (computed by the runner, so cached under the same keys as a `features` run: such a run on the same data
and backbone later reads them instead of computing them), then a linear classifier on them (multinomial
logistic regression, L-BFGS, L2 chosen by cross-validation on the train images; deterministic), ranked by val
accuracy, with the time each took and the model's size.

`measure_domain_gap(...)`: on a sample of the data at a small image size, the linear classifier's val accuracy
against a short fine-tune of the last layer group started from it. A large gain means the pretrained top
layers do not fit these images (a distant domain); `advice.recommend_strategy` turns it into a strategy.
"""
from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from domain.callbacks import BatchProgress, CallbackList, Callbacks
from domain.catalog import CATALOG
from domain.errors import DataError, GraftError, RunStopped, SpecError, WeightsUnavailable
from domain.layout import discover
from domain.results import DomainGap, ProbeResult, ProbeRow
from domain.spec import ProbeSpec, RunSpec

from . import probe_multilabel as ml_probe
from .backbones import get_info, weights_available
from .schedules import phase_scheduler

log = logging.getLogger(__name__)

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 3
CV_MAX_ROWS = 20_000  # the L2 search runs on at most this many train rows (the final fit uses all of them)

# the advisor's sample: up to 50 images per class (train and val), at most 400 train and 500 val images in all
ADVISE_TRAIN_PER_CLASS = 50
ADVISE_VAL_PER_CLASS = 50
ADVISE_MAX_TRAIN = 400
ADVISE_MAX_VAL = 500
ADVISE_IMAGE_SIZE = 128
ADVISE_EPOCHS = 6
ADVISE_LR = 3e-4
ADVISE_BATCH = 16
ADVISE_NEAR_BEST = 0.02  # measure with the smallest backbone within 2 points of the best


# ---------------------------------------------------------------- the linear probe


@dataclass
class LinearProbe:
    """A linear classifier on raw (unstandardized) features: logits = x @ weight.T + bias."""

    weight: torch.Tensor  # [classes, features], float32
    bias: torch.Tensor  # [classes], float32
    l2: float
    cv_acc: float | None  # mean cross-validated accuracy of the chosen L2 (None: too few images to validate)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.T + self.bias


def _lbfgs(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int = 200):
    """Multinomial logistic regression on standardized float64 features: mean cross-entropy + l2/2 |W|^2."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def stratified_folds(image_labels: list[int], k: int, seed: int) -> list[int]:
    """A stratified, seeded fold number for each image."""
    g = torch.Generator().manual_seed(seed)
    fold = [0] * len(image_labels)
    for c in sorted(set(image_labels)):
        ids = [i for i, lbl in enumerate(image_labels) if lbl == c]
        for r, j in enumerate(torch.randperm(len(ids), generator=g).tolist()):
            fold[ids[j]] = r % k
    return fold


class _threads:
    """Run a block with `n` intra-op threads: small fits are many tiny operations, which several threads only
    slow down (much more so on a busy machine)."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n != self.old:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, groups: torch.Tensor | None = None,
                     seed: int = 0, l2_grid: Sequence[float] = L2_GRID, folds: int = CV_FOLDS) -> LinearProbe:
    """Fit a linear classifier to features `x` [N, D] with labels `y` [N]. `groups` [N] names the image each row
    comes from (rows of augmented views of one image share it): cross-validation folds never split an image.
    The L2 strength with the best cross-validated accuracy (ties: lower log loss) is refit on every row.
    Deterministic: same inputs, same classifier."""
    small = x.shape[0] * x.shape[1] * max(classes, 2) < 50_000_000
    with _threads(1 if small else torch.get_num_threads()):
        return _fit(x, y, classes, groups, seed, l2_grid, folds)


def _fit(x, y, classes, groups, seed, l2_grid, folds) -> LinearProbe:
    x64 = x.double()
    y = y.long()
    groups = torch.arange(len(y)) if groups is None else groups.long()
    mu = x64.mean(0)
    sd = x64.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x64 - mu) / sd
    # fewer rows than features: the L2-regularized optimum lies in the span of the rows, so fit in that basis
    # (xs = U S Vh, w = Vh.T w'), the same classifier at a fraction of the cost
    basis = None
    if xs.shape[0] < xs.shape[1]:
        u, sv, basis = torch.linalg.svd(xs, full_matrices=False)
        xs = u * sv
    images = sorted(set(groups.tolist()))
    index = {g: i for i, g in enumerate(images)}
    label_of = [0] * len(images)
    for g, lbl in zip(groups.tolist(), y.tolist()):
        label_of[index[g]] = lbl
    smallest = min([label_of.count(c) for c in set(label_of)] or [0])
    k = min(folds, smallest)
    best_l2, cv_acc = sorted(l2_grid)[len(l2_grid) // 2], None
    if k >= 2 and len(l2_grid) > 1:
        fold_of_image = stratified_folds(label_of, k, seed)
        row_fold = torch.tensor([fold_of_image[index[g]] for g in groups.tolist()])
        rows = torch.arange(len(y))
        if len(rows) > CV_MAX_ROWS:  # a seeded subset of rows keeps the search cheap on large datasets
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:CV_MAX_ROWS]]
        scores = []
        for l2 in l2_grid:
            accs, losses = [], []
            for f in range(k):
                tr, te = rows[row_fold[rows] != f], rows[row_fold[rows] == f]
                if len(te) == 0 or len(set(y[tr].tolist())) < 2:
                    continue
                w, b = _lbfgs(xs[tr], y[tr], classes, l2, max_iter=100)
                logits = xs[te] @ w + b
                accs.append((logits.argmax(1) == y[te]).double().mean().item())
                losses.append(F.cross_entropy(logits, y[te]).item())
            if accs:
                scores.append((sum(accs) / len(accs), -sum(losses) / len(losses), l2))
        if scores:
            cv_acc, _, best_l2 = max(scores)
    w, b = _lbfgs(xs, y, classes, best_l2)
    if basis is not None:
        w = basis.T @ w
    # fold the standardization into the weights: ((x - mu) / sd) @ w + b = x @ (w / sd) + (b - (mu / sd) @ w)
    weight = (w / sd[:, None]).T.contiguous()
    bias = b - (mu / sd) @ w
    return LinearProbe(weight.float(), bias.float(), float(best_l2), cv_acc)


# ---------------------------------------------------------------- progress of a probe


class ProgressWindow(Callbacks):
    """Passes the runner's callbacks on, with the progress of one step (one backbone, the advisor) mapped into
    its window [lo, hi] of the whole probe, never going back, and an ETA from the elapsed time."""

    SPANS = {"decode": (0.0, 0.3), "features": (0.3, 0.95), "probe": (0.95, 1.0)}

    def __init__(self, cb: Callbacks, t0: float):
        self.cb, self.t0 = cb, t0
        self.lo, self.hi, self.last = 0.0, 1.0, 0.0
        self.spans: dict = self.SPANS
        self.stage: str | None = None

    def window(self, lo: float, hi: float, spans: dict | None = None, stage: str | None = None) -> None:
        self.lo, self.hi, self.spans, self.stage = lo, hi, spans or self.SPANS, stage

    def on_message(self, message: str) -> None:
        self.cb.on_message(message)

    def on_progress(self, p: BatchProgress) -> None:
        a, b = self.spans.get(p.stage, (0.0, 1.0))
        part = min(1.0, p.done / max(1, p.total))
        if p.stage == "train" and p.epochs:
            part = min(1.0, (max(p.epoch, 1) - 1 + part) / p.epochs)
        frac = max(self.last, min(self.hi, self.lo + (self.hi - self.lo) * (a + (b - a) * part)))
        self.last = frac
        elapsed = time.perf_counter() - self.t0
        # what the step itself still needs (measured on its own batches) is a floor: the elapsed-time estimate
        # is too low when earlier steps were quick (features from the cache)
        eta = max(elapsed * (1 - frac) / frac if frac > 0.02 else 0.0, p.eta)
        self.cb.on_progress(BatchProgress(self.stage or p.stage, 0, 0, p.done, p.total, elapsed, eta, frac))

    def should_stop(self) -> bool:
        return self.cb.should_stop()


# ---------------------------------------------------------------- one backbone


def _model_size(model) -> tuple[int, float]:
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return params, round(size / 1e6, 2)


def feature_runner(spec: RunSpec, data_dir: Path, cb: Callbacks, cache_dir, device, max_pixels: int | None = None):
    from domain.images import DEFAULT_MAX_PIXELS

    from .runner import Runner

    # no output folder: a probe writes nothing but feature-cache entries
    return Runner(spec, data_dir, None, cb, cache_dir=cache_dir, device=device,
                  max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


def probe_backbone(data_dir: Path, backbone: str, pretrained: bool, spec: ProbeSpec, cb: Callbacks,
                   cache_dir=None, device: str | None = None, max_pixels: int | None = None) -> ProbeRow:
    """One leaderboard row: features (from the cache when there), linear probe, val accuracy and loss."""
    from .progress import Progress as _Progress

    t0 = time.perf_counter()
    info = get_info(backbone)
    size = None if info.fixed_size else spec.image_size
    rs = RunSpec(backbone=backbone, pretrained=pretrained, strategy="features", epochs=1, image_size=size,
                 augment=spec.augment, feature_views=spec.feature_views, val_fraction=spec.val_fraction,
                 batch_size=spec.batch_size, seed=spec.seed)
    r = feature_runner(rs, data_dir, cb, cache_dir, device, max_pixels)
    try:
        r.prepare()
        progress = _Progress(r.cb, t0, 0)
        tf = time.perf_counter()
        r.compute_features(progress)
        feature_seconds = time.perf_counter() - tf
        views = len(r.train_feats)
        x = torch.cat(r.train_feats)
        y = torch.tensor(r.train_labels * views)
        groups = torch.arange(len(r.train_labels)).repeat(views)
        tp = time.perf_counter()
        extra: dict = {}
        if r.split.multilabel:  # one sigmoid per label; ranked by mAP
            lp = LinearProbe(*ml_probe.fit_for_run(r, x, groups, spec.seed), None)
            figures = ml_probe.scores(lp.logits(r.val_feats), ml_probe.val_targets(r).numpy())
            val_acc, val_loss = figures["val_acc"], figures["val_loss"]
            extra = {"mAP": round(figures["mAP"], 6), "micro_f1": round(figures["micro_f1"], 6)}
        else:
            lp = fit_linear_probe(x, y, len(r.classes), groups, seed=spec.seed)
            logits = lp.logits(r.val_feats)
            yv = torch.tensor(r.val_labels)
            val_acc = (logits.argmax(1) == yv).float().mean().item()
            val_loss = F.cross_entropy(logits, yv).item()
        progress("probe", 0, 1, 1, tp)
        params, size_mb = _model_size(r.model)
        return ProbeRow.model_validate({
            "backbone": backbone, "pretrained": pretrained, "val_acc": val_acc, "val_loss": round(val_loss, 6),
            "seconds": round(time.perf_counter() - t0, 3), "feature_seconds": round(feature_seconds, 3),
            "fit_seconds": round(time.perf_counter() - tp, 3),
            "images_per_s": round(r.feature_rate, 1) if r.feature_rate else None,
            "params": params, "size_mb": size_mb, "weights": r.weights, "image_size": r.pre.image_size,
            "feature_dim": r.model.num_features, "cached": bool(r.features_from_cache),
            "l2": lp.l2, "cv_acc": lp.cv_acc, "train_images": len(r.train_labels), "val_images": len(r.val_labels),
            "skipped": list(r.skipped), "error": None, **extra,
        })
    finally:
        del r
        gc.collect()


# ---------------------------------------------------------------- the domain gap


def _cap_per_class(items: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    rng = random.Random(seed)
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    out = []
    for _, its in sorted(by.items()):
        out.extend(rng.sample(its, min(n, len(its))))
    return sorted(out)


def measure_domain_gap(data_dir: str | Path, backbone: str = "efficientnet_lite0",
                       cache_dir: str | Path | None = None, callbacks: Callbacks | None = None, *,
                       train_per_class: int = ADVISE_TRAIN_PER_CLASS, val_per_class: int = ADVISE_VAL_PER_CLASS,
                       image_size: int | None = ADVISE_IMAGE_SIZE, epochs: int = ADVISE_EPOCHS,
                       lr: float = ADVISE_LR, seed: int = 0, val_fraction: float = 0.2,
                       device: str | None = None, max_pixels: int | None = None) -> DomainGap:
    """How much adjusting the last layer group gains over a linear classifier on the frozen features, on a
    sample (up to `train_per_class` / `val_per_class` images per class, at `image_size`): the linear probe is
    fitted first, the fine-tune (finetune_last:1, `epochs` epochs) starts from it, and both are scored on the
    same val images. Returns the figures `advice.recommend_strategy` takes."""
    from domain.advice import paired_stderr

    from .progress import Progress as _Progress

    t0 = time.perf_counter()
    cb = CallbackList(callbacks)
    info = get_info(backbone)
    rs = RunSpec(backbone=backbone, pretrained=True, strategy="finetune_last:1", epochs=epochs,
                 image_size=None if info.fixed_size else image_size, batch_size=ADVISE_BATCH, augment="light",
                 feature_views=1, val_fraction=val_fraction, seed=seed, lr=lr, warmup_epochs=0, dropout=0.0,
                 patience=None)
    r = feature_runner(rs, Path(data_dir), cb, cache_dir, device, max_pixels)
    try:
        r.prepare()
        k = max(1, len(r.classes))
        r.split.train = _cap_per_class(r.split.train, max(1, min(train_per_class, ADVISE_MAX_TRAIN // k)), seed)
        r.split.val = _cap_per_class(r.split.val, max(1, min(val_per_class, ADVISE_MAX_VAL // k)), seed)
        progress = _Progress(r.cb, t0, epochs)
        r.compute_features(progress, need_images=True)
        yv = torch.tensor(r.val_labels)
        if r.split.multilabel:  # an image is right when every label is (at 0.5); the fine-tune trains with BCE
            lp = LinearProbe(*ml_probe.fit_for_run(r, torch.cat(r.train_feats), torch.arange(len(r.train_labels)),
                                                   seed), None)
            right = ml_probe.prepare_finetune(r)
        else:
            lp = fit_linear_probe(torch.cat(r.train_feats), torch.tensor(r.train_labels), len(r.classes), seed=seed)

            def right(logits: torch.Tensor) -> torch.Tensor:
                return logits.argmax(1) == yv
        probe_right = right(lp.logits(r.val_feats))
        model = r.model
        linear = model.head[-1]
        with torch.no_grad():
            linear.weight.copy_(lp.weight.to(linear.weight.device))
            linear.bias.copy_(lp.bias.to(linear.bias.device))
        top = list(model.groups())[-1]
        phase = r.phases[0]
        opt = r.optimizer(phase)  # the last group and the head train, everything else is frozen
        steps = math.ceil(len(r.train_idx) / rs.batch_size)
        sched = phase_scheduler(opt, "constant", epochs, 0, steps)
        for epoch in range(1, epochs + 1):
            # the trainer's epoch (autocast, the out-of-memory retry), all layers in eval mode: batch norm keeps
            # its pretrained statistics (a few small batches would only blur them); one val pass at the end
            r.train_epoch_on_images(phase, opt, sched, None, epoch, progress, validate=False, keep_eval=True)
        ft_right = right(r.predict_val(False, epochs, progress))
        n = len(yv)
        only_probe = int((probe_right & ~ft_right).sum())
        only_ft = int((ft_right & ~probe_right).sum())
        probe_acc, ft_acc = probe_right.float().mean().item(), ft_right.float().mean().item()
        return DomainGap.model_validate({
            "backbone": backbone, "probe_acc": probe_acc, "finetune_acc": ft_acc,
            "gain": round(ft_acc - probe_acc, 6), "stderr": round(paired_stderr(n, only_probe, only_ft), 6),
            "val_images": n, "train_images": len(r.train_labels), "image_size": r.pre.image_size,
            "epochs": epochs, "finetuned": top, "seconds": round(time.perf_counter() - t0, 3),
        })
    finally:
        del r
        gc.collect()


# ---------------------------------------------------------------- the whole probe


def rank(rows: list[ProbeRow]) -> list[ProbeRow]:
    """Best val accuracy first (multi-label data: best mAP; ties: lower val loss, then faster); rows with an
    error last."""
    def key(r: ProbeRow) -> tuple[float, float, float]:
        score = r.mAP if r.mAP is not None else r.val_acc
        return -(score or 0.0), r.val_loss or 0.0, r.seconds or 0.0

    ok = sorted((r for r in rows if r.error is None), key=key)
    bad = [r for r in rows if r.error is not None]
    return [r.model_copy(update={"rank": i if r.error is None else None}) for i, r in enumerate(ok + bad, 1)]


def _available(name: str) -> bool:
    return CATALOG[name].weights_available() if name in CATALOG else weights_available(get_info(name))


def default_backbones() -> list[str]:
    """Every backbone whose pretrained weights are on this machine, in catalog order."""
    return [name for name in CATALOG if _available(name)]


def _targets(backbones: Sequence[str] | None, random_init: bool) -> list[tuple[str, bool]]:
    names = list(backbones) if backbones else default_backbones()
    for n in names:
        get_info(n)  # UnknownBackbone, with the list of names
    if not names:
        raise WeightsUnavailable("no backbone has its pretrained weights on this machine: import some with "
                                 "`graft weights import FILE --backbone NAME` (see `graft backbones`), or name "
                                 "backbones to probe from random weights")
    if backbones:
        missing = [n for n in names if not _available(n)]
        if missing and not random_init:
            raise WeightsUnavailable(f"pretrained weights for {', '.join(missing)} are not on this machine: import "
                                     f"them with `graft weights import FILE --backbone NAME`, or leave them out")
    targets = [(n, True) for n in names if _available(n)]
    if random_init:
        targets += [(n, False) for n in names]
    return targets


def probe(data_dir: str | Path, spec: ProbeSpec | None = None, cache_dir: str | Path | None = None,
          callbacks: Callbacks | None = None, device: str | None = None,
          targets: Sequence[tuple[str, bool]] | None = None, max_pixels: int | None = None) -> ProbeResult:
    """Rank backbones on the data in `data_dir` by the val accuracy of a linear classifier on their frozen
    features. `spec` is a spec.ProbeSpec (default: every available backbone, with the advisor); `targets`
    overrides its backbones with explicit (name, pretrained) pairs. A backbone that cannot be used (weights
    missing, out of memory) gets a row with its error; a problem with the data raises DataError."""
    spec = spec or ProbeSpec()
    t0 = time.perf_counter()
    cb = CallbackList(callbacks)
    split = discover(Path(data_dir), spec.val_fraction, spec.seed)  # DataError before any model is built
    targets = list(targets) if targets is not None else _targets(spec.backbones, spec.random_init)
    from .device import pick_device

    dev = str(pick_device(device))
    cb.on_start({"classes": split.classes, "counts": split.counts(), "layout": split.layout, "device": dev,
                 "phases": ["probe"], "epochs": 0, "warnings": split.warnings})
    for w in split.warnings:
        cb.on_message(w)
    result = ProbeResult(status="completed", classes=split.classes, counts=split.counts(), layout=split.layout,
                         device=dev, warnings=list(split.warnings))
    window = ProgressWindow(cb, t0)
    share = 0.75 if spec.advise else 1.0
    rows: list[ProbeRow] = []
    try:
        for i, (name, pretrained) in enumerate(targets):
            label = name if pretrained else f"{name} (random init)"
            window.window(share * i / len(targets), share * (i + 1) / len(targets))
            cb.on_message(f"{label}: computing features ({i + 1} of {len(targets)})")
            try:
                row = probe_backbone(Path(data_dir), name, pretrained, spec, window, cache_dir, device, max_pixels)
            except RunStopped:
                raise
            except (WeightsUnavailable, SpecError) as e:
                row = ProbeRow(backbone=name, pretrained=pretrained, error=str(e))
            except DataError:
                raise
            except (RuntimeError, GraftError) as e:  # out of memory, an architecture that fails on this size
                log.exception("probing %s failed", label)
                row = ProbeRow(backbone=name, pretrained=pretrained, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            if row.error:
                cb.on_message(f"{label}: failed: {row.error}")
            else:
                cb.on_message(f"{label}: {100 * (row.val_acc or 0):.1f}% val accuracy in {row.seconds or 0:.1f} s"
                              + (" (features from the cache)" if row.cached else ""))
        result.rows = rank(rows)
        good = [r for r in result.rows if r.error is None and r.pretrained]
        if spec.advise and good:
            best = good[0].val_acc or 0.0
            pick = min((r for r in good if (r.val_acc or 0.0) >= best - ADVISE_NEAR_BEST),
                       key=lambda r: r.params or 0)
            window.window(share, 1.0, {"decode": (0.0, 0.25), "features": (0.25, 0.4), "train": (0.4, 0.95),
                                       "val": (0.95, 1.0)}, stage="advise")
            cb.on_message(f"measuring how far the images are from ImageNet with {pick.backbone}: a short "
                          "fine-tune of its last block on a sample")
            try:
                m = measure_domain_gap(
                    data_dir, pick.backbone, cache_dir, window, seed=spec.seed, val_fraction=spec.val_fraction,
                    image_size=min(ADVISE_IMAGE_SIZE, spec.image_size or ADVISE_IMAGE_SIZE), device=device,
                    max_pixels=max_pixels)
            except (RunStopped, DataError):
                raise
            except (RuntimeError, GraftError) as e:  # the leaderboard stands; the advice falls back to size
                log.exception("measuring the domain gap failed")
                cb.on_message(f"could not measure how far the images are from ImageNet ({type(e).__name__}: "
                              f"{str(e)[:300]}): the strategy advice rests on the data size alone")
            else:
                result.measured = m
                cb.on_message(f"linear probe {100 * m.probe_acc:.1f}%, last block fine-tuned "
                              f"{100 * m.finetune_acc:.1f}% on {m.val_images} val images ({m.seconds:.1f} s)")
        elif spec.advise:
            cb.on_message("no pretrained backbone could be probed: the strategy advice rests on the data size alone")
    except RunStopped:
        result.status = "stopped"
        result.rows = rank(rows)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result
