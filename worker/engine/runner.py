"""run(spec, data_dir, out_dir, callbacks) -> RunResult: one training run, start to finish.

Frozen-backbone phases train the head on backbone features computed once (train images in
`feature_views` augmented views, val images once), optionally cached on disk across runs.
Phases that unfreeze layers train on images from an in-memory store of decoded, resized images.
Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, RNG, history) from which
`resume=True` continues; the best epoch (lowest val loss) is what the model file keeps.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import freeze
from .backbones import GraftNet, Preprocessing, build_model, get_info, weights_id
from domain.callbacks import BatchProgress, Callbacks, CallbackList, EpochMetric
from .data import (DataSplit, ImageDataset, ImageStore, discover, eval_transform, normalize, subsample,
                   train_transform)
from domain.errors import CheckpointError, DataError, RunStopped, SpecError
from domain.evaluate import confusion_png, evaluation
from domain.images import DEFAULT_MAX_PIXELS
from .modelfile import atomic_save, save_model_file
from domain.spec import RunSpec

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class RunResult:
    status: str  # "completed", "early_stopped" or "stopped"
    classes: list[str]
    val_acc: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float = 0.0
    train_images_per_s: float = 0.0
    model_path: str | None = None
    history: list[EpochMetric] = field(default_factory=list)
    report: dict | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    device: str = "cpu"
    counts: dict | None = None
    val_files: list[str] = field(default_factory=list)  # absolute paths of the val images used

    def summary(self) -> dict:
        return {
            "status": self.status,
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 3),
            "train_images_per_s": round(self.train_images_per_s, 2),
            "classes": self.classes,
            "counts": self.counts,
            "model_path": self.model_path,
            "device": self.device,
            "macro_f1": self.report["macro_f1"] if self.report else None,
            "skipped": self.skipped,
            "warnings": self.warnings,
        }


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_cpu_threads() -> int:
    """Use every core this process may run on (cgroup/affinity aware), not the machine's count."""
    n = max(1, len(os.sched_getaffinity(0)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _is_oom(e: BaseException) -> bool:
    """Out of GPU memory (or, on CPU, an allocation that failed)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _cpu_copy(obj):
    """A deep copy with every tensor on the CPU (a state dict's tensors are the live ones)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def fingerprint(items: list[tuple[Path, int]], root: Path) -> str:
    """Identifies a list of labelled files by name, size and modification time."""
    h = hashlib.sha256()
    for p, lbl in items:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p.is_relative_to(root) else p}|{st.st_size}|{st.st_mtime_ns}|{lbl}\n".encode())
    return h.hexdigest()


DECODE_SHARE = 0.05  # of the bar given to decoding the images, before any later stage is timed


class _Progress:
    """Turns batch counts into BatchProgress events with elapsed time and an ETA."""

    def __init__(self, cb: Callbacks, t0: float, epochs: int):
        self.cb, self.t0, self.epochs = cb, t0, epochs
        self.eta = 0.0
        self.last = 0.0  # fractions only grow

    def __call__(self, stage: str, epoch: int, done: int, total: int, stage_t0: float, eta_after: float = 0.0):
        now = time.perf_counter()
        rate = (now - stage_t0) / max(done, 1)
        eta = rate * (total - done) + eta_after
        elapsed = now - self.t0
        fraction = elapsed / (elapsed + eta) if elapsed + eta > 0 else 0.0
        if stage == "decode":
            # the stages after decoding have not been timed yet, so a time-based share would overstate
            # it (seen: 81% after decoding, then back to 42% once features were being computed)
            fraction = DECODE_SHARE * done / max(total, 1)
        self.last = fraction = max(self.last, fraction)
        self.cb.on_progress(BatchProgress(stage, epoch, self.epochs, done, total, elapsed, eta, fraction))
        if self.cb.should_stop():
            raise RunStopped("stopped on request")


class Runner:
    def __init__(self, spec: RunSpec, data_dir: str | Path, out_dir: str | Path,
                 callbacks: Callbacks | None = None, resume: bool = False,
                 cache_dir: str | Path | None = None, device: str | None = None,
                 store_budget_bytes: int = 3 << 30, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.spec = spec
        self.max_pixels = max_pixels  # larger images are skipped and named (a server's GRAFT_MAX_IMAGE_PIXELS)
        self.data_dir = Path(data_dir)
        self.out = Path(out_dir)
        self.cb = CallbackList(callbacks)
        self.resume = resume
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = pick_device(device)
        self.budget = store_budget_bytes
        self.ckpt_dir = self.out / "checkpoints"
        self.accum = 1  # gradient accumulation steps per batch (raised when the GPU runs out of memory)

    # ------------------------------------------------------------ setup

    def _prepare(self) -> None:
        spec = self.spec
        if self.device.type == "cpu":
            set_cpu_threads()
        seed_everything(spec.seed)
        self.info = get_info(spec.backbone)
        pre = self.info.preprocessing
        if spec.image_size and spec.image_size != pre.image_size:
            if self.info.fixed_size:
                raise SpecError(f"{spec.backbone} only takes {pre.image_size}x{pre.image_size} images: "
                                f"leave image_size empty or pick another backbone")
            pre = pre.with_size(spec.image_size)
        self.pre: Preprocessing = pre
        self.split: DataSplit = discover(self.data_dir, spec.val_fraction, spec.seed)
        if spec.max_train_images:
            self.split.train = subsample(self.split.train, spec.max_train_images, spec.seed)
        self.classes = self.split.classes
        # build first: a missing-weights error must come before minutes of decoding
        self.model: GraftNet = build_model(spec.backbone, len(self.classes), spec.pretrained, spec.dropout,
                                           seed=spec.seed)
        self.weights = weights_id(self.info) if spec.pretrained else f"random-init-seed{spec.seed}"
        self.channels_last = self.info.channels_last
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = None
        if self.device.type == "cuda" and spec.mixed_precision:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.phases = freeze.plan(spec.strategy, list(self.model.groups()), spec.epochs, spec.head_epochs,
                                  spec.warmup_epochs)
        self.total_epochs = sum(p.epochs for p in self.phases)

    def _decode(self, progress: _Progress) -> None:
        items = self.split.train + self.split.val
        t = time.perf_counter()
        store = ImageStore([p for p, _ in items], self.pre, self.budget, max_pixels=self.max_pixels,
                           progress=lambda d, n: progress("decode", 0, d, n, t))
        self.skipped = [f"{self.split.rel(items[i][0])}: {msg.split(': ', 1)[-1]}"
                        for i, msg in sorted(store.errors.items())]
        for s in self.skipped:
            self.cb.on_message(f"skipped {s}")
        n_train = len(self.split.train)
        keep = [i for i in range(len(items)) if i not in store.errors]
        self.train_idx = [i for i in keep if i < n_train]
        self.val_idx = [i for i in keep if i >= n_train]
        self.train_labels = [items[i][1] for i in self.train_idx]
        self.val_labels = [items[i][1] for i in self.val_idx]
        self.items = items
        left = set(self.train_labels)
        gone = [c for i, c in enumerate(self.classes) if i not in left]
        if gone:
            raise DataError(f"no readable training images left for class(es) {', '.join(gone)} "
                            f"({len(self.skipped)} images skipped): replace the unreadable files")
        if not self.val_labels:
            raise DataError("no readable validation images left: replace the unreadable files in val/")
        self.store = store

    # ------------------------------------------------------------ batches

    def _loader(self, idx, labels, transform, shuffle: bool):
        ds = ImageDataset(self.store, idx, labels, transform)
        cached = all(self.store.cache[i] is not None for i in idx)
        workers = 0 if cached else min(4, len(os.sched_getaffinity(0)))
        return torch.utils.data.DataLoader(ds, batch_size=self.spec.batch_size, shuffle=shuffle,
                                           num_workers=workers, pin_memory=self.device.type == "cuda",
                                           persistent_workers=False)

    def _inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        return normalize(x_u8.to(self.device, non_blocking=True), self.pre, self.channels_last)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # ------------------------------------------------------------ features

    def _feature_key(self, preset: str, view: int, idx: list[int]) -> str:
        payload = {
            "v": 1, "backbone": self.spec.backbone, "weights": self.weights, "pre": self.pre.to_dict(),
            "preset": preset, "view": view, "seed": self.spec.seed,
            "items": fingerprint([self.items[i] for i in idx], self.split.root),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    @torch.inference_mode()
    def _extract(self, idx, labels, preset: str, view: int, progress: _Progress, stage_t0: float,
                 done_before: int, total: int) -> torch.Tensor:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / "features" / f"{self._feature_key(preset, view, idx)}.pt"
            if path.is_file():
                try:
                    feats = torch.load(path, map_location="cpu", weights_only=True)
                    if feats.shape == (len(idx), self.model.num_features):
                        progress("features", 0, done_before + len(idx), total, stage_t0)
                        self.cache_hits += 1
                        return feats
                except Exception:  # a corrupt cache entry is recomputed
                    log.warning("ignoring unreadable feature cache %s", path)
        transform = eval_transform(self.pre.image_size) if preset == "eval" else train_transform(
            preset, self.pre.image_size)
        body = self.model.body
        body.eval()
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed * 1009 + view + 1)
            done = done_before
            for x, _ in self._loader(idx, labels, transform, shuffle=False):
                with self._autocast():
                    f = body(self._inputs(x))
                out.append(f.float().cpu())
                done += len(x)
                progress("features", 0, done, total, stage_t0, self._eta_after_features(done, stage_t0))
        feats = torch.cat(out)
        if path is not None:
            atomic_save(feats, path)
        return feats

    def _features(self, progress: _Progress) -> None:
        views = 1 if self.spec.augment == "none" else self.spec.feature_views
        preset = "eval" if self.spec.augment == "none" else self.spec.augment
        total = len(self.train_idx) * views + len(self.val_idx)
        t = time.perf_counter()
        self.cache_hits = 0
        self.val_feats = self._extract(self.val_idx, self.val_labels, "eval", 0, progress, t, 0, total)
        self.train_feats = [
            self._extract(self.train_idx, self.train_labels, preset, v, progress, t,
                          len(self.val_idx) + v * len(self.train_idx), total)
            for v in range(views)
        ]
        self.feature_seconds = time.perf_counter() - t
        self.feature_rate = total / max(self.feature_seconds, 1e-9)
        self.features_from_cache = self.cache_hits == views + 1
        if self.cache_hits:
            self.cb.on_message(f"features of {self.cache_hits} of {views + 1} image sets read from the cache")

    def _features_from_cache(self, progress: _Progress) -> bool:
        """Every feature part in the cache under the keys of a run where every image was readable: take them
        and skip decoding altogether (the keys fingerprint each file's name, size and mtime). False, and
        nothing changed, when one part is missing; then decoding finds out which images are readable."""
        if self.cache_dir is None or not self.split.val or not self.split.train:
            return False
        views = 1 if self.spec.augment == "none" else self.spec.feature_views
        preset = "eval" if self.spec.augment == "none" else self.spec.augment
        self.items = self.split.train + self.split.val
        n_train = len(self.split.train)
        train_idx, val_idx = list(range(n_train)), list(range(n_train, len(self.items)))
        parts = [("eval", 0, val_idx)] + [(preset, v, train_idx) for v in range(views)]
        t = time.perf_counter()
        feats = []
        for preset_, view, idx in parts:
            path = self.cache_dir / "features" / f"{self._feature_key(preset_, view, idx)}.pt"
            if not path.is_file():
                return False
            try:
                f = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                return False
            if f.shape != (len(idx), self.model.num_features):
                return False
            feats.append(f)
        total = len(train_idx) * views + len(val_idx)
        done = 0
        for (_, _, idx), _f in zip(parts, feats):
            done += len(idx)
            progress("features", 0, done, total, t)
        self.train_idx, self.val_idx = train_idx, val_idx
        self.train_labels = [self.items[i][1] for i in train_idx]
        self.val_labels = [self.items[i][1] for i in val_idx]
        self.skipped = []
        self.store = None
        self.val_feats, self.train_feats = feats[0], feats[1:]
        self.feature_seconds = time.perf_counter() - t
        self.feature_rate = None  # nothing was computed: no measure of the backbone's speed
        self.cache_hits = len(parts)
        self.features_from_cache = True
        self.cb.on_message(f"features of all {len(self.items)} images read from the cache: nothing to decode")
        return True

    def compute_features(self, progress: _Progress, need_images: bool = False) -> None:
        """Frozen-backbone features of the val images and of every augmented train view, from the cache when
        it has them. Unless a later phase trains on images (`need_images`), a complete cache hit skips
        decoding the images."""
        if not need_images and self._features_from_cache(progress):
            return
        self._decode(progress)
        self._features(progress)

    # ------------------------------------------------------------ optimisation

    def _optimizer(self, phase: freeze.Phase) -> torch.optim.Optimizer:
        groups = freeze.apply_phase(self.model, phase)
        lr = self.spec.effective_lr()
        pg = [{"params": g["params"], "lr": phase.lr_for(g["name"], lr), "name": g["name"]} for g in groups]
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(pg, lr=lr, momentum=0.9, nesterov=True, weight_decay=self.spec.weight_decay)
        return torch.optim.AdamW(pg, lr=lr, weight_decay=self.spec.weight_decay)

    def _scheduler(self, opt, phase: freeze.Phase, steps_per_epoch: int):
        total = max(1, phase.epochs * steps_per_epoch)
        warm = int(round(phase.warmup_epochs * steps_per_epoch))
        kind = self.spec.schedule

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            p = min(1.0, (step - warm) / max(1, total - warm))
            if kind == "cosine":
                return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))
            if kind == "step":  # x0.1 after a third and after two thirds of the phase
                return 0.1 ** min(2, int(p * 3))
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def _batch_size(self, on_features: bool) -> int:
        """Training the head on cached features costs nothing per step, so small datasets get smaller
        batches there: at least 10 optimizer steps per epoch, never more than batch_size per batch."""
        if not on_features:
            return self.spec.batch_size
        return max(1, min(self.spec.batch_size, math.ceil(len(self.train_idx) / 10)))

    def _loss(self, logits, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=self.spec.label_smoothing)

    # ------------------------------------------------------------ epochs

    def _epoch_on_features(self, phase, opt, sched, epoch: int, progress: _Progress):
        feats = self.train_feats[(epoch - 1) % len(self.train_feats)]
        y_all = torch.tensor(self.train_labels)
        head = self.model.head
        head.train()
        perm = torch.randperm(len(y_all))
        bs = self._batch_size(True)
        n_batches = math.ceil(len(perm) / bs)
        loss_sum = correct = seen = 0
        t = time.perf_counter()
        for b in range(n_batches):
            sel = perm[b * bs:(b + 1) * bs]
            x, y = feats[sel].to(self.device), y_all[sel].to(self.device)
            logits = head(x)
            loss = self._loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            progress("train", epoch, b + 1, n_batches, t, self._eta_after_epoch(epoch))
        return loss_sum / seen, correct / seen, seen, time.perf_counter() - t

    def _micro(self) -> int:
        """The batch that goes through the model at once: batch_size split into `accum` parts."""
        return max(1, math.ceil(self.spec.batch_size / self.accum))

    def _epoch_on_images(self, phase, opt, sched, scaler, epoch: int, progress: _Progress):
        """One optimizer step per batch of batch_size images; with accum > 1 the batch goes through the
        model in `accum` micro-batches whose gradients add up to the whole batch's."""
        freeze.train_mode(self.model, phase)
        loader = self._loader(self.train_idx, self.train_labels,
                              train_transform(self.spec.augment, self.pre.image_size), shuffle=True)
        loss_sum = correct = seen = 0
        micro = self._micro()
        t = time.perf_counter()
        for b, (x_all, y_all) in enumerate(loader):
            n = len(y_all)
            opt.zero_grad(set_to_none=True)
            for x, y in zip(x_all.split(micro), y_all.split(micro)):
                x, y = self._inputs(x), y.to(self.device)
                with self._autocast():
                    logits = self.model(x)
                loss = self._loss(logits, y)
                if len(y) != n:
                    loss = loss * (len(y) / n)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                loss_sum += loss.item() * n
                correct += (logits.argmax(1) == y).sum().item()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            seen += n
            self.image_seconds = (time.perf_counter() - t) / seen  # per train image, until epochs are timed
            progress("train", epoch, b + 1, len(loader), t, self._eta_after_epoch(epoch))
        return loss_sum / seen, correct / seen, seen, time.perf_counter() - t

    def _snapshot(self, opt, sched, scaler) -> dict:
        """Everything an epoch changes, copied to the CPU, to start the epoch over."""
        return {"model": _cpu_copy(self.model.state_dict()), "optimizer": _cpu_copy(opt.state_dict()),
                "scheduler": _cpu_copy(sched.state_dict()), "scaler": scaler.state_dict() if scaler else None,
                "rng": _rng_state()}

    def _epoch_on_images_retrying(self, phase, opt, sched, scaler, epoch: int, progress: _Progress):
        """Train and validate one epoch on images. Out of GPU memory: restore the state of the epoch's start,
        halve the micro-batch (accumulating gradients so that every optimizer step still sees batch_size
        images), say so, and run the epoch again; give up at one image per micro-batch."""
        snap = self._snapshot(opt, sched, scaler)
        while True:
            try:
                tl, ta, seen, ttrain = self._epoch_on_images(phase, opt, sched, scaler, epoch, progress)
                logits = self._predict_val(False, epoch, progress)
                return tl, ta, seen, ttrain, logits
            except Exception as e:
                if not _is_oom(e):
                    raise
                detail = str(e).split("\n")[0][:200]
            # out of the except block, so that the failed step's tensors (held by the traceback) are freed
            before = self._micro()
            if before <= 1:
                raise SpecError(f"out of memory even with one image at a time ({detail}): pick a smaller "
                                "image_size or backbone, or free the GPU")
            while self._micro() == before:
                self.accum *= 2
            opt.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model.load_state_dict(snap["model"])
            opt.load_state_dict(snap["optimizer"])
            sched.load_state_dict(snap["scheduler"])
            if scaler is not None and snap["scaler"]:
                scaler.load_state_dict(snap["scaler"])
            _set_rng_state(snap["rng"])
            msg = (f"out of memory at batch size {before}: retrying the epoch with batch {self._micro()} x "
                   f"{self.accum} accumulation")
            log.warning("%s (%s)", msg, detail)
            self.cb.on_message(msg)

    @torch.inference_mode()
    def _predict_val(self, use_features: bool, epoch: int, progress: _Progress) -> torch.Tensor:
        """Logits for every val image (float32, CPU)."""
        self.model.eval()
        if use_features:
            return self.model.head(self.val_feats.to(self.device)).float().cpu()
        out = []
        t = time.perf_counter()
        loader = self._loader(self.val_idx, self.val_labels, eval_transform(self.pre.image_size), shuffle=False)
        for b, (x_all, _) in enumerate(loader):
            for x in x_all.split(self._micro()):
                with self._autocast():
                    out.append(self.model(self._inputs(x)).float().cpu())
            progress("val", epoch, b + 1, len(loader), t, self._eta_after_epoch(epoch))
        return torch.cat(out)

    def _eta_after_features(self, done: int, stage_t0: float) -> float:
        """Estimated seconds for all epochs, from the forward speed measured while computing features: an
        epoch on images costs about 3 forward passes per train image and one per val image."""
        per_image = (time.perf_counter() - stage_t0) / max(done, 1)
        n_train, n_val = len(self.split.train), len(self.split.val)
        return sum(p.epochs * (0.05 if p.backbone_frozen else (3 * n_train + n_val) * per_image)
                   for p in self.phases)

    def _eta_after_epoch(self, epoch: int) -> float:
        """Estimated seconds for the epochs after `epoch`."""
        left = 0.0
        e = 0
        for phase in self.phases:
            for _ in range(phase.epochs):
                e += 1
                if e > epoch:
                    left += self._epoch_estimate(phase)
        return left

    def _epoch_estimate(self, phase: freeze.Phase) -> float:
        times = self.epoch_times.get(self._mode(phase))
        if times:
            return sum(times) / len(times)
        if phase.backbone_frozen:
            return 0.05
        # forward+backward costs about 3x a forward pass; the val pass is one forward
        per_image = getattr(self, "image_seconds", None)
        if per_image:  # measured on the first epoch's batches
            return (len(self.train_idx) + len(self.val_idx) / 3) * per_image
        rate = getattr(self, "feature_rate", None)
        if rate:
            return (3 * len(self.train_idx) + len(self.val_idx)) / rate
        return 0.0

    def _mode(self, phase: freeze.Phase) -> str:
        return "features" if phase.backbone_frozen and self.use_feature_cache else "images"

    # ------------------------------------------------------------ checkpoints

    def _state_for_ckpt(self, body_touched: bool) -> dict:
        """The full model once any body layer has trained; before that only the head (the body is
        the pretrained one and is rebuilt on resume)."""
        if body_touched:
            return {"full": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        return {"head": {k: v.detach().cpu().clone() for k, v in self.model.head.state_dict().items()}}

    def _load_state(self, st: dict) -> None:
        if "full" in st:
            self.model.load_state_dict(st["full"])
        else:
            self.model.head.load_state_dict(st["head"])

    def _save_checkpoint(self, state: dict) -> None:
        path = self.ckpt_dir / "last.pt"
        atomic_save(state, path)
        self.cb.on_checkpoint(path, "last")

    def _load_checkpoint(self) -> dict | None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            return None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path} is unreadable ({e}): delete it to start the run over") from e
        if ck.get("version") != CHECKPOINT_VERSION or ck.get("spec") != self.spec.model_dump():
            raise CheckpointError(f"{path} belongs to a run with other parameters: use another --out "
                                  "folder or delete the checkpoint to start over")
        if ck.get("classes") != self.classes:
            raise CheckpointError(f"{path} was trained on classes {ck.get('classes')}, the data now has "
                                  f"{self.classes}: use another --out folder")
        return ck

    # ------------------------------------------------------------ the run

    def run(self) -> RunResult:
        t0 = time.perf_counter()
        self._prepare()
        self.epoch_times: dict[str, list[float]] = {}
        progress = _Progress(self.cb, t0, self.total_epochs)
        self.use_feature_cache = self.phases[0].backbone_frozen
        self.cb.on_start({
            "classes": self.classes, "counts": self.split.counts(), "layout": self.split.layout,
            "device": str(self.device), "phases": [p.name for p in self.phases],
            "epochs": self.total_epochs, "warnings": self.split.warnings,
        })
        for w in self.split.warnings:
            self.cb.on_message(w)

        ck = self._load_checkpoint() if self.resume else None
        history: list[EpochMetric] = []
        best = {"val_loss": math.inf, "epoch": None, "state": None, "val_acc": None}
        start_phase, start_epoch_in_phase, global_epoch = 0, 0, 0
        body_touched = False
        elapsed_before = 0.0
        status = "completed"
        train_seen = 0
        try:
            if self.use_feature_cache:
                self.compute_features(progress, need_images=not all(p.backbone_frozen for p in self.phases))
            else:
                self._decode(progress)
            if ck is not None:
                self._load_state(ck["model"])
                history = [EpochMetric(**h) for h in ck["history"]]
                best = {"val_loss": ck["best"]["val_loss"], "epoch": ck["best"]["epoch"],
                        "val_acc": ck["best"]["val_acc"], "state": ck["best"]["state"]}
                start_phase, start_epoch_in_phase = ck["phase_index"], ck["epoch_in_phase"]
                global_epoch, body_touched = ck["epoch"], ck["body_touched"]
                elapsed_before, train_seen = ck["elapsed"], ck["train_seen"]
                self.epoch_times = ck["epoch_times"]
                self.accum = ck.get("accum", 1)
                self.cb.on_message(f"resumed after epoch {global_epoch}")
            else:
                global_epoch = 0

            for pi, phase in enumerate(self.phases):
                if pi < start_phase:
                    continue
                resuming_phase = ck is not None and pi == start_phase
                first = start_epoch_in_phase if resuming_phase else 0
                if first >= phase.epochs:
                    start_phase, start_epoch_in_phase = start_phase + 1, 0  # that phase had ended
                    continue
                on_feats = phase.backbone_frozen and self.use_feature_cache
                if not phase.backbone_frozen:
                    body_touched = True
                opt = self._optimizer(phase)
                steps = math.ceil(len(self.train_idx) / self._batch_size(on_feats))
                sched = self._scheduler(opt, phase, steps)
                scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 and not on_feats
                          else None)
                bad_epochs = 0
                if resuming_phase and first > 0:
                    opt.load_state_dict(ck["optimizer"])
                    sched.load_state_dict(ck["scheduler"])
                    if scaler is not None and ck.get("scaler"):
                        scaler.load_state_dict(ck["scaler"])
                    bad_epochs = ck["bad_epochs"]
                elif pi > 0 and best["state"] is not None:
                    # a new phase starts from the best weights so far
                    self._load_state(best["state"])
                    if not phase.backbone_frozen and "head" in best["state"]:
                        # from here on the body changes: keep the best head with its pretrained body
                        best["state"] = self._state_for_ckpt(True)
                if ck is not None:
                    _set_rng_state(ck["rng"])
                    ck = None
                self.cb.on_message(f"phase {phase.name}: {phase.epochs} epoch(s), trains "
                                   f"{', '.join(phase.trainable)}")
                for e_in in range(first, phase.epochs):
                    global_epoch += 1
                    te = time.perf_counter()
                    if on_feats:
                        tl, ta, seen, ttrain = self._epoch_on_features(phase, opt, sched, global_epoch, progress)
                        logits = self._predict_val(True, global_epoch, progress)
                    else:
                        tl, ta, seen, ttrain, logits = self._epoch_on_images_retrying(
                            phase, opt, sched, scaler, global_epoch, progress)
                    train_seen += seen
                    yv = torch.tensor(self.val_labels)
                    vl = F.cross_entropy(logits, yv).item()
                    va = (logits.argmax(1) == yv).float().mean().item()
                    secs = time.perf_counter() - te
                    self.epoch_times.setdefault(self._mode(phase), []).append(secs)
                    improved = vl < best["val_loss"] - 1e-6
                    if improved:
                        best = {"val_loss": vl, "epoch": global_epoch, "val_acc": va,
                                "state": self._state_for_ckpt(body_touched)}
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                    elapsed = elapsed_before + time.perf_counter() - t0
                    m = EpochMetric(global_epoch, phase.name, tl, ta, vl, va,
                                    opt.param_groups[-1]["lr"], seen / max(ttrain, 1e-9), secs, elapsed,
                                    self._eta_after_epoch(global_epoch), improved)
                    history.append(m)
                    stop_early = (self.spec.patience is not None and bad_epochs >= self.spec.patience
                                  and e_in + 1 < phase.epochs)
                    self._save_checkpoint({
                        "version": CHECKPOINT_VERSION, "spec": self.spec.model_dump(), "classes": self.classes,
                        "epoch": global_epoch, "phase_index": pi if not stop_early else pi + 1,
                        "epoch_in_phase": e_in + 1 if not stop_early else 0,
                        "model": self._state_for_ckpt(body_touched), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "rng": _rng_state(), "history": [h.to_dict() for h in history],
                        "best": best, "bad_epochs": bad_epochs, "body_touched": body_touched,
                        "elapsed": elapsed, "train_seen": train_seen, "epoch_times": self.epoch_times,
                        "accum": self.accum,
                    })
                    self.cb.on_epoch_end(m)
                    if stop_early:
                        self.cb.on_message(f"early stop in phase {phase.name}: val loss has not improved "
                                           f"for {bad_epochs} epoch(s)")
                        if pi == len(self.phases) - 1:
                            status = "early_stopped"
                        break
                    if self.cb.should_stop():
                        raise RunStopped("stopped on request")
        except RunStopped:
            status = "stopped"

        seconds = elapsed_before + time.perf_counter() - t0
        result = RunResult(status, self.classes, epochs_run=len(history), seconds=seconds,
                           train_images_per_s=train_seen / max(seconds, 1e-9), history=history,
                           warnings=self.split.warnings, skipped=getattr(self, "skipped", []),
                           device=str(self.device), counts=self.split.counts())
        if status == "stopped" or best["state"] is None:
            result.status = "stopped"
            return result
        # the model file keeps the best epoch
        self._load_state(best["state"])
        use_feats = self.use_feature_cache and "full" not in best["state"]
        logits = self._predict_val(use_feats, global_epoch, progress)
        files = [self.split.rel(self.items[i][0]) for i in self.val_idx]
        result.val_files = [str(self.items[i][0]) for i in self.val_idx]
        report = evaluation(logits.softmax(1).numpy(), self.val_labels, files, self.classes)
        result.val_acc, result.val_loss, result.best_epoch = report["accuracy"], best["val_loss"], best["epoch"]
        result.report = report
        metrics = {"val_acc": result.val_acc, "val_loss": result.val_loss, "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "report": report,
                   "history": [h.to_dict() for h in history]}
        model_path = self.out / "model.pt"
        save_model_file(model_path, self.model, self.classes, self.pre, self.spec.model_dump(), metrics,
                        self.weights)
        self.cb.on_checkpoint(model_path, "model")
        try:
            confusion_png(report["confusion_matrix"], self.classes, self.out / "confusion_matrix.png")
        except Exception as e:  # a picture must never fail a finished run
            log.warning("could not draw the confusion matrix: %s", e)
        result.model_path = str(model_path)
        result.seconds = elapsed_before + time.perf_counter() - t0
        (self.out / "metrics.json").write_text(json.dumps(
            {**result.summary(), "history": metrics["history"], "report": report}, indent=2))
        return result


def run(spec: RunSpec, data_dir: str | Path, out_dir: str | Path, callbacks: Callbacks | None = None,
        resume: bool = False, cache_dir: str | Path | None = None, device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS) -> RunResult:
    """Train `spec` on the images in `data_dir`, writing checkpoints and model.pt under `out_dir`. Images of
    more than `max_pixels` (width x height) are skipped and named."""
    return Runner(spec, data_dir, out_dir, callbacks, resume, cache_dir, device, max_pixels=max_pixels).run()
