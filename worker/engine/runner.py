"""run(spec, data_dir, out_dir, callbacks) -> RunResult: one training run, start to finish.

Frozen-backbone phases train the head on backbone features computed once (train images in `feature_views`
augmented views, val images once), optionally cached on disk across runs. Phases that unfreeze layers train on
images from an in-memory store of decoded, resized images. Every epoch ends with an atomic checkpoint (model,
optimizer, scheduler, RNG, history) from which `resume=True` continues; the best epoch (lowest val loss) is what
the model file keeps, with its calibration and abstention (run_trust.py). With `spec.search` the parameters are
searched first (search.py) and the run trains with what it chose."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from domain.callbacks import CallbackList, Callbacks, EpochMetric
from domain.errors import RunStopped, SpecError
from domain.images import DEFAULT_MAX_PIXELS
from domain.layout import DataSplit, discover, subsample
from domain.results import SearchReport
from domain.spec import RunSpec

from . import freeze
from .backbones import GraftNet, Preprocessing, build_model, get_info, weights_id
from .balance import ClassWeighting, LabelWeighting
from .checkpoint import (
    CHECKPOINT_VERSION,
    Best,
    CheckpointState,
    load_checkpoint,
    load_model_state,
    model_state,
    save_checkpoint,
)
from .compiling import Compiled
from .data import ImageStore, decode_split, eval_transform, image_loader, normalize, train_augmentation
from .device import amp_dtype_for, autocast, pick_device, rng_state, seed_everything, set_cpu_threads, set_rng_state
from .features import FeatureCache, FeatureExtractor
from .loop import hits, micro_batch, predict, retry_on_oom, train_epoch_on_features, train_epoch_on_images, val_loss
from .outputs import effective_parameters, write_metrics, write_outputs
from .progress import Progress as _Progress
from .progress import epoch_estimate, eta_after_epoch, eta_after_features, expected_epochs
from .result import RunResult
from .schedules import phase_scheduler
from .search import tune
from .task import evaluate_best, set_weighting

__all__ = ["CHECKPOINT_VERSION", "RunResult", "Runner", "pick_device", "run", "seed_everything", "set_cpu_threads"]


class Runner:
    """One training run. `run()` does it all; the probe composes the public steps (prepare, compute_features,
    optimizer, train_epoch_on_images, predict_val) with no output folder (`out_dir=None`: nothing written)."""

    def __init__(self, spec: RunSpec, data_dir: str | Path, out_dir: str | Path | None = None,
                 callbacks: Callbacks | None = None, resume: bool = False,
                 cache_dir: str | Path | FeatureCache | None = None, device: str | None = None,
                 store_budget_bytes: int = 3 << 30, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.spec = spec  # with spec.search, the run trains with the searched values: `tune` replaces it
        self.requested = spec  # the spec as given: what a checkpoint belongs to
        self.search: SearchReport | None = None  # what the search tried and chose (search.py)
        self.max_pixels = max_pixels  # larger images are skipped and named (a server's GRAFT_MAX_IMAGE_PIXELS)
        self.data_dir = Path(data_dir)
        self.out = Path(out_dir) if out_dir is not None else None
        self.cb = CallbackList(callbacks)
        self.resume = resume
        self.feature_cache = cache_dir if isinstance(cache_dir, FeatureCache) else FeatureCache(cache_dir) if cache_dir else None
        self.cache_dir = self.feature_cache.root if self.feature_cache is not None else None
        self.device = pick_device(device)
        self.budget = store_budget_bytes
        self.accum = 1  # gradient accumulation steps per batch (raised when the GPU runs out of memory)
        self.epoch_times: dict[str, list[float]] = {}  # seconds of each epoch so far, by mode
        self.use_feature_cache = False  # the frozen phases train the head on cached features (set by prepare)
        self.store: ImageStore | None = None  # this and the next ones: set by compute_features / decode
        self.items: list[tuple[Path, int]] = []
        self.train_idx: list[int] = []  # indices into items of the readable train and val images
        self.val_idx: list[int] = []
        self.train_labels: list[int] = []
        self.val_labels: list[int] = []
        self.skipped: list[str] = []  # "file: why" of each unreadable image
        self.cache_hits = 0  # feature sets read from the cache
        self.train_feats: list[torch.Tensor] = []
        self.val_feats = torch.empty(0)
        self.feature_rate: float | None = None
        self.features_from_cache = False
        self.image_seconds: float | None = None
        self.weighting: ClassWeighting | LabelWeighting | None = None  # the loss's weighting (set by run: task.py)
        self.class_weights: torch.Tensor | None = None  # those weights as a tensor (None: unweighted)
        self.expected: dict[int, int] = {}  # epochs a phase (by index) ran or will likely run, when early stopping

    # ------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Seed, read the split, build the model (a missing-weights error before any decoding), plan phases."""
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
        self.amp_dtype = amp_dtype_for(self.device, spec.mixed_precision)
        self.compiled = Compiled(self.model)  # GRAFT_COMPILE: the train steps and the feature extraction
        if line := self.compiled.describe():
            self.cb.on_message(line)
        self.phases = freeze.plan(spec.strategy, list(self.model.groups()), spec.max_epochs(), spec.head_epochs,
                                  spec.warmup_epochs)
        self.total_epochs = sum(p.epochs for p in self.phases)
        self.open_ended = {0} if spec.until_plateau else set()  # phases that train until val loss plateaus
        self.expected = {i: expected_epochs(self.phases[i].epochs, 0, 0, spec.effective_patience())
                         for i in self.open_ended}
        self.use_feature_cache = self.phases[0].backbone_frozen

    def _decode(self, progress: _Progress) -> None:
        t = time.perf_counter()
        d = decode_split(self.split, self.pre, self.budget, self.max_pixels,
                         lambda done, n: progress("decode", 0, done, n, t), lambda s: self.cb.on_message(f"skipped {s}"))
        self.store, self.items, self.skipped, self.train_idx, self.val_idx = d.store, d.items, d.skipped, d.train_idx, d.val_idx
        self.train_labels = [self.items[i][1] for i in self.train_idx]
        self.val_labels = [self.items[i][1] for i in self.val_idx]

    # ------------------------------------------------------------ batches

    def _loader(self, idx, labels, transform, shuffle: bool):
        if self.store is None:
            raise RuntimeError("the images are not decoded: call compute_features(need_images=True) first")
        return image_loader(self.store, idx, labels, transform, self.spec.batch_size, shuffle, self.device)

    def train_batches(self):
        """Shuffled, augmented batches of the train images as (model inputs, labels) on the device."""
        aug = train_augmentation(self.spec.augment, self.pre.image_size, self.device)
        loader = self._loader(self.train_idx, self.train_labels, aug, shuffle=True)
        return ((self._inputs(x), y.to(self.device)) for x, y in loader)

    def _inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        return normalize(x_u8.to(self.device, non_blocking=True), self.pre, self.channels_last)

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)
    # ------------------------------------------------------------ features

    def _extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.feature_cache, self.compiled.body(), self.model.num_features, self.spec.backbone,
                                self.weights, self.pre.to_dict(), self.spec.seed, self.split.root)

    def _extract(self, idx, labels, preset: str, view: int, progress: _Progress, stage_t0: float,
                 done_before: int, total: int) -> torch.Tensor:
        transform = (eval_transform(self.pre.image_size) if preset == "eval"
                     else train_augmentation(preset, self.pre.image_size, self.device))
        feats, hit = self._extractor().get(
            [self.items[i] for i in idx], preset, view,
            lambda a, b: self._loader(idx[a:b], labels[a:b], transform, shuffle=False),
            self._inputs, self._autocast, lambda done: progress(
                "features", 0, done_before + done, total, stage_t0,
                self._eta_after_features(done_before + done, stage_t0)))
        if hit:
            progress("features", 0, done_before + len(idx), total, stage_t0)
            self.cache_hits += 1
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
        extractor = self._extractor()
        for preset_, view, idx in parts:
            f = extractor.cached(preset_, view, [self.items[i] for i in idx])
            if f is None:
                return False
            feats.append(f)
        total = len(train_idx) * views + len(val_idx)
        for k in range(1, len(parts) + 1):
            progress("features", 0, sum(len(idx) for _, _, idx in parts[:k]), total, t)
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

    def optimizer(self, phase: freeze.Phase) -> torch.optim.Optimizer:
        groups = freeze.apply_phase(self.model, phase)
        lr = self.spec.effective_lr()
        pg = [{"params": g["params"], "lr": phase.lr_for(g["name"], lr), "name": g["name"]} for g in groups]
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(pg, lr=lr, momentum=0.9, nesterov=True, weight_decay=self.spec.weight_decay)
        return torch.optim.AdamW(pg, lr=lr, weight_decay=self.spec.weight_decay)

    def batch_size(self, on_features: bool) -> int:
        """Training the head on cached features costs nothing per step, so small datasets get smaller
        batches there: at least 10 optimizer steps per epoch, never more than batch_size per batch."""
        if not on_features:
            return self.spec.batch_size
        return max(1, min(self.spec.batch_size, math.ceil(len(self.train_idx) / 10)))

    # ------------------------------------------------------------ epochs

    def _epoch_on_features(self, phase, opt, sched, epoch: int, progress: _Progress):
        feats = self.train_feats[(epoch - 1) % len(self.train_feats)]
        return train_epoch_on_features(
            self.model.head, feats, self.train_labels, opt, sched, self.device, self.batch_size(True),
            self.spec.effective_label_smoothing(),
            lambda done, n, t, seen: progress("train", epoch, done, n, t, self._eta_after_epoch(epoch)),
            self.class_weights)

    def _epoch_on_images(self, phase, opt, sched, scaler, epoch: int, progress: _Progress, micro: int,
                         keep_eval: bool):
        if keep_eval:
            self.model.eval()
        else:
            freeze.train_mode(self.model, phase)
        loader = self._loader(self.train_idx, self.train_labels,
                              train_augmentation(self.spec.augment, self.pre.image_size, self.device), shuffle=True)

        def on_batch(done: int, n: int, t: float, seen: int) -> None:
            self.image_seconds = (time.perf_counter() - t) / seen  # per train image, until epochs are timed
            progress("train", epoch, done, n, t, self._eta_after_epoch(epoch))

        return train_epoch_on_images(self.compiled.train(), loader, opt, sched, scaler, self._inputs, self._autocast, micro,
                                     self.device, self.spec.effective_label_smoothing(), on_batch,
                                     class_weights=self.class_weights)

    def train_epoch_on_images(self, phase, opt, sched, scaler, epoch: int, progress: _Progress,
                              validate: bool = True, keep_eval: bool = False):
        """Train (and, with `validate`, predict the val images after) one epoch on images, rerun with half the
        micro-batch when out of GPU memory. `keep_eval`: every layer stays in eval mode (batch norm keeps its
        pretrained statistics, which a few small batches would only blur). Returns (train loss, train
        accuracy, images seen, train seconds, val logits or None)."""
        def attempt(micro: int):
            tl, ta, seen, ttrain = self._epoch_on_images(phase, opt, sched, scaler, epoch, progress, micro, keep_eval)
            return tl, ta, seen, ttrain, self.predict_val(False, epoch, progress, micro) if validate else None

        result, self.accum = retry_on_oom(attempt, self.model, opt, sched, scaler, self.device,
                                          self.spec.batch_size, self.accum, self.cb.on_message)
        return result

    @torch.inference_mode()
    def predict_val(self, use_features: bool, epoch: int, progress: _Progress, micro: int | None = None):
        """Logits for every val image (float32, CPU)."""
        self.model.eval()
        if use_features:
            return self.model.head(self.val_feats.to(self.device)).float().cpu()
        loader = self._loader(self.val_idx, self.val_labels, eval_transform(self.pre.image_size), shuffle=False)
        return predict(self.model, loader, self._inputs, self._autocast, micro or micro_batch(self.spec.batch_size, self.accum),
                       lambda done, n, t: progress("val", epoch, done, n, t, self._eta_after_epoch(epoch)))

    def _eta_after_features(self, done: int, stage_t0: float) -> float:
        return eta_after_features(self.phases, done, stage_t0, len(self.split.train), len(self.split.val),
                                  self.expected)

    def _eta_after_epoch(self, epoch: int) -> float:
        return eta_after_epoch(self.phases, epoch, self._epoch_estimate, self.expected)

    def _epoch_estimate(self, phase: freeze.Phase) -> float:
        return epoch_estimate(self.epoch_times.get(self._mode(phase)), phase.backbone_frozen, len(self.train_idx),
                              len(self.val_idx), self.image_seconds, self.feature_rate)

    def _mode(self, phase: freeze.Phase) -> str:
        return "features" if phase.backbone_frozen and self.use_feature_cache else "images"

    # ------------------------------------------------------------ checkpoints

    def _ckpt_path(self) -> Path:
        if self.out is None:
            raise ValueError("this runner has no output folder: give out_dir to train with checkpoints")
        return self.out / "checkpoints" / "last.pt"

    def _save_checkpoint(self, state: CheckpointState) -> None:
        path = self._ckpt_path()
        save_checkpoint(state, path)
        self.cb.on_checkpoint(path, "last")

    def _load_checkpoint(self) -> CheckpointState | None:
        return load_checkpoint(self._ckpt_path(), self.requested.model_dump(), self.classes)

    # ------------------------------------------------------------ the run

    def run(self) -> RunResult:
        t0 = time.perf_counter()
        self.prepare()
        out = self._ckpt_path().parent.parent
        progress = _Progress(self.cb, t0, self.total_epochs)
        self.cb.on_start({
            "classes": self.classes, "counts": self.split.counts(), "layout": self.split.layout,
            "device": str(self.device), "phases": [p.name for p in self.phases],
            "epochs": self.total_epochs, "warnings": self.split.warnings,
        })
        for w in self.split.warnings:
            self.cb.on_message(w)

        ck = self._load_checkpoint() if self.resume else None
        history: list[EpochMetric] = []
        best = Best()
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
            set_weighting(self)
            self.search = tune(self, progress, ck.search if ck else None, lambda: self._eta_after_epoch(0))
            if ck is not None:
                load_model_state(self.model, ck.model)
                history = [EpochMetric(**h) for h in ck.history]
                best = ck.best
                start_phase, start_epoch_in_phase = ck.phase_index, ck.epoch_in_phase
                global_epoch, body_touched = ck.epoch, ck.body_touched
                elapsed_before, train_seen = ck.elapsed, ck.train_seen
                self.epoch_times = ck.epoch_times
                self.accum = ck.accum
                self.cb.on_message(f"resumed after epoch {global_epoch}")

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
                opt = self.optimizer(phase)
                steps = math.ceil(len(self.train_idx) / self.batch_size(on_feats))
                sched = phase_scheduler(opt, self.spec.schedule, phase.epochs, phase.warmup_epochs, steps)
                scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 and not on_feats
                          else None)
                bad_epochs = 0
                if resuming_phase and first > 0 and ck is not None:
                    opt.load_state_dict(ck.optimizer)
                    sched.load_state_dict(ck.scheduler)
                    if scaler is not None and ck.scaler:
                        scaler.load_state_dict(ck.scaler)
                    bad_epochs = ck.bad_epochs
                elif pi > 0 and best.state is not None:
                    # a new phase starts from the best weights so far
                    load_model_state(self.model, best.state)
                    if not phase.backbone_frozen and "head" in best.state:
                        # from here on the body changes: keep the best head with its pretrained body
                        best.state = model_state(self.model, True)
                if ck is not None:
                    set_rng_state(ck.rng)
                    ck = None
                self.cb.on_message(f"phase {phase.name}: {phase.epochs} epoch(s), trains "
                                   f"{', '.join(phase.trainable)}")
                for e_in in range(first, phase.epochs):
                    global_epoch += 1
                    te = time.perf_counter()
                    if on_feats:
                        tl, ta, seen, ttrain = self._epoch_on_features(phase, opt, sched, global_epoch, progress)
                        logits = self.predict_val(True, global_epoch, progress)
                    else:
                        tl, ta, seen, ttrain, logits = self.train_epoch_on_images(
                            phase, opt, sched, scaler, global_epoch, progress)
                    train_seen += seen
                    yv = torch.tensor(self.val_labels)
                    vl = val_loss(logits, yv, self.class_weights)
                    va = hits(logits, yv, self.class_weights) / max(len(yv), 1)
                    secs = time.perf_counter() - te
                    self.epoch_times.setdefault(self._mode(phase), []).append(secs)
                    improved = vl < best.val_loss - 1e-6
                    if improved:
                        best = Best(vl, global_epoch, va, model_state(self.model, body_touched))
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                    stop_early = bad_epochs >= (self.spec.effective_patience() or math.inf) and e_in + 1 < phase.epochs
                    if stop_early or pi in self.open_ended:  # for the ETA
                        self.expected[pi] = expected_epochs(phase.epochs, e_in + 1, bad_epochs,
                                                            self.spec.effective_patience(), stop_early)
                    elapsed = elapsed_before + time.perf_counter() - t0
                    m = EpochMetric(global_epoch, phase.name, tl, ta, vl, va,
                                    opt.param_groups[-1]["lr"], seen / max(ttrain, 1e-9), secs, elapsed,
                                    self._eta_after_epoch(global_epoch), improved)
                    history.append(m)
                    self._save_checkpoint(CheckpointState(
                        spec=self.requested.model_dump(), classes=self.classes, epoch=global_epoch,
                        phase_index=pi if not stop_early else pi + 1,
                        epoch_in_phase=e_in + 1 if not stop_early else 0,
                        model=model_state(self.model, body_touched), optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), scaler=scaler.state_dict() if scaler else None,
                        rng=rng_state(), history=[h.to_dict() for h in history], best=best,
                        bad_epochs=bad_epochs, body_touched=body_touched, elapsed=elapsed,
                        train_seen=train_seen, epoch_times=self.epoch_times, accum=self.accum,
                        search=self.search.model_dump(mode="json") if self.search is not None else None))
                    self.cb.on_epoch_end(m)
                    if stop_early:
                        self.cb.on_message(f"early stop after epoch {global_epoch} (best: {best.epoch}) in phase "
                                           f"{phase.name}: val loss has not improved for {bad_epochs} epoch(s)")
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
                           warnings=self.split.warnings, skipped=self.skipped, device=str(self.device),
                           counts=self.split.counts(), max_epochs=self.total_epochs,
                           effective=effective_parameters(self.spec, self.total_epochs, self.pre, self.weighting,
                                                          self.search, self.phases), search=self.search)
        if status == "stopped" or best.state is None:
            result.status = "stopped"
            return result
        # the model file keeps the best epoch
        load_model_state(self.model, best.state)
        use_feats = self.use_feature_cache and "full" not in best.state
        logits = self.predict_val(use_feats, global_epoch, progress)
        trust, labels = evaluate_best(self, logits, use_feats, out, result)
        result.val_loss, result.best_epoch = best.val_loss, best.epoch
        write_outputs(out, self.model, self.pre, self.spec.model_dump(), self.weights, result, history, self.cb,
                      trust, labels)
        result.seconds = elapsed_before + time.perf_counter() - t0
        write_metrics(out, result, history)
        return result


def run(spec: RunSpec, data_dir: str | Path, out_dir: str | Path, callbacks: Callbacks | None = None,
        resume: bool = False, cache_dir: str | Path | FeatureCache | None = None, device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS, store_bytes: int = 3 << 30) -> RunResult:
    """Train `spec` on `data_dir`, writing checkpoints and model.pt under `out_dir`; images over `max_pixels`
    are skipped and named; at most `store_bytes` of decoded images are kept in memory. `spec.devices > 1`: data-parallel, one process per device (engine.distributed)."""
    if spec.devices > 1 and spec.strategy_kind != "features":  # a features run trains only the head: 1 process
        from .distributed import run_distributed
        return run_distributed(Runner, spec, data_dir, out_dir, callbacks, resume, cache_dir, device, max_pixels)
    return Runner(spec, data_dir, out_dir, callbacks, resume, cache_dir, device, store_bytes, max_pixels).run()
