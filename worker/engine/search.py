"""The search of a run's parameters ("models that do not need knobs", RunSpec.search).

On the cached frozen features (computed once, by the run), each trial trains a copy of the run's new head with
other parameters: learning rate, weight decay, dropout and label smoothing, sampled by Optuna's TPE sampler
(seeded by the run's seed; the first trial is the spec's own values), each trial trained as the run's head phase
trains (the same schedule, batches, epochs and early stopping on val loss) and scored by its best val loss;
trials whose best val loss so far is worse than the median of the earlier trials at the same epoch are pruned.
The run then trains its head with the best trial's parameters from the same initial head and the same random
state, so that on the CPU it repeats the best trial exactly.

Phases that unfreeze layers (finetune_last:N, full, two_stage's second stage) cannot be tried on cached
features: a learning-rate range test (lr_find.py) picks their learning rate, after the search (two_stage: with
the best trial's head in place, the way fastai's fine_tune finds the rate after the frozen epochs).

Determinism: the same seed and data give the same trials, parameters and figures (on the CPU).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from domain.callbacks import Callbacks
from domain.errors import RunStopped
from domain.results import LrRangeTest, SearchReport, SearchTrial
from domain.spec import RunSpec

from . import freeze
from .loop import MultiLabel, Weighting, hits, train_epoch_on_features, val_loss
from .lr_find import lr_range_test
from .schedules import phase_scheduler

log = logging.getLogger(__name__)

# the ranges searched (log: sampled on a log scale); SGD's learning rates are 10x AdamW's (see RunSpec.effective_lr)
SPACE: dict[str, tuple[float, float, bool]] = {
    "lr": (1e-5, 1e-1, True),
    "weight_decay": (1e-6, 1e-1, True),
    "dropout": (0.0, 0.5, False),
    "label_smoothing": (0.0, 0.2, False),
}
# no trial is pruned before this many trials have completed, nor before this many of its epochs
PRUNE_STARTUP_TRIALS = 5
PRUNE_WARMUP_EPOCHS = 5


@dataclass
class HeadData:
    """What a trial trains and scores a head on: the cached features of each augmented train view and of the val
    images, with their labels, the classes' loss weights and the batch size of the run's head phase."""

    train_feats: Sequence[torch.Tensor]
    train_labels: list[int]
    val_feats: torch.Tensor
    val_labels: list[int]
    class_weights: Weighting  # or the multi-label objective (loop.MultiLabel)
    batch_size: int
    device: torch.device


def space(spec: RunSpec) -> dict[str, tuple[float, float, bool]]:
    """The searched parameters' ranges for `spec` (those of spec.search.params)."""
    assert spec.search is not None
    scale = {"lr": 10.0 if spec.optimizer == "sgd" else 1.0}
    return {k: (lo * scale.get(k, 1.0), hi * scale.get(k, 1.0), log_) for k, (lo, hi, log_) in SPACE.items()
            if k in spec.search.params}


def spec_values(spec: RunSpec) -> dict[str, float]:
    """The spec's own values of the searchable parameters (the first trial's, within the ranges)."""
    return {"lr": spec.effective_lr(), "weight_decay": spec.weight_decay, "dropout": spec.dropout,
            "label_smoothing": spec.effective_label_smoothing()}


def with_params(spec: RunSpec, params: dict[str, float]) -> RunSpec:
    """`spec` with the searched values set, as if they had been given."""
    return spec.model_copy(update={k: float(v) for k, v in params.items() if k in SPACE})


# ---------------------------------------------------------------- one trial


def set_dropout(head: torch.nn.Module, p: float) -> None:
    """The head's dropout (GraftNet's head is Sequential(Dropout, Linear))."""
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


@dataclass
class TrialFit:
    val_loss: float  # the best epoch's
    val_acc: float
    best_epoch: int
    epochs: int
    pruned: bool
    head_state: dict[str, torch.Tensor]  # the best epoch's head


def _optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer the run builds for its head phase (Runner.optimizer)."""
    pg = [{"params": list(params), "lr": lr, "name": freeze.HEAD}]
    if kind == "sgd":
        return torch.optim.SGD(pg, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(pg, lr=lr, weight_decay=weight_decay)


def fit_head(initial_head: torch.nn.Module, data: HeadData, spec: RunSpec, phase: freeze.Phase,
             report: Callable[[float, int], bool] | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> TrialFit:
    """Train a copy of `initial_head` as the run trains its head phase with `spec`'s parameters, from the current
    random state: `phase.epochs` at the most, stopping when val loss has not improved for the effective patience.
    `report(best val loss so far, epoch)` returns True to prune the trial there."""
    head = copy.deepcopy(initial_head).to(data.device)
    set_dropout(head, spec.dropout)
    opt = _optimizer(spec.optimizer, head.parameters(), phase.lr_for(freeze.HEAD, spec.effective_lr()),
                     spec.weight_decay)
    steps = math.ceil(len(data.train_labels) / data.batch_size)
    sched = phase_scheduler(opt, spec.schedule, phase.epochs, phase.warmup_epochs, steps)
    yv = torch.tensor(data.val_labels)
    val = data.val_feats.to(data.device)
    patience = spec.effective_patience() or math.inf
    best_loss, best_acc, best_epoch, bad = math.inf, 0.0, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    epoch = 0
    for epoch in range(1, phase.epochs + 1):
        train_epoch_on_features(head, data.train_feats[(epoch - 1) % len(data.train_feats)], data.train_labels, opt,
                                sched, data.device, data.batch_size, spec.effective_label_smoothing(),
                                lambda *_: None, data.class_weights)
        head.eval()
        with torch.inference_mode():
            logits = head(val).float().cpu()
        vl = val_loss(logits, yv, data.class_weights)
        if not math.isfinite(vl):  # diverged: no later epoch comes back
            break
        if vl < best_loss - 1e-6:  # as the run decides its best epoch
            best_loss, best_acc, best_epoch, bad = vl, hits(logits, yv, data.class_weights) / max(len(yv), 1), epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
        if should_stop():
            raise RunStopped("stopped on request")
        if report is not None and report(best_loss, epoch):
            return TrialFit(best_loss, best_acc, best_epoch, epoch, True, best_state)
        if bad >= patience:
            break
    return TrialFit(best_loss, best_acc, best_epoch, epoch, False, best_state)


# ---------------------------------------------------------------- the search


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """A block that draws from torch's RNG seeded with `seed` and leaves the caller's RNG as it was."""
    gpu = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[gpu] if gpu is not None else []):
        torch.manual_seed(seed)
        yield


def search_head(spec: RunSpec, phase: freeze.Phase, data: HeadData, initial_head: torch.nn.Module,
                cb: Callbacks, on_trial: Callable[[int, int], None] | None = None) -> tuple[SearchReport, dict | None]:
    """Search the head's parameters (spec.search) on cached features. Returns the report and the best trial's
    trained head (its state dict; None when no trial converged). Every trial starts from `initial_head` and torch's RNG seeded with the run's
    seed; the caller's RNG is left as it was."""
    import optuna

    assert spec.search is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranges = space(spec)
    if isinstance(data.class_weights, MultiLabel) and ranges.pop("label_smoothing", None) is not None:
        cb.on_message("label smoothing is not searched: multi-label training (binary cross-entropy per label) "
                      "does not use it")
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS,
                                         n_warmup_steps=PRUNE_WARMUP_EPOCHS)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    own = spec_values(spec)
    study.enqueue_trial({k: min(hi, max(lo, own[k])) for k, (lo, hi, _) in ranges.items()})
    trials: list[SearchTrial] = []
    best_head: dict = {}  # the best complete trial's trained head
    t0 = time.perf_counter()
    n = spec.search.trials

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_float(k, lo, hi, log=log_) for k, (lo, hi, log_) in ranges.items()}
        tt = time.perf_counter()

        def report(value: float, epoch: int) -> bool:
            trial.report(value, epoch)
            return trial.should_prune()

        with _seeded(spec.seed, data.device):
            fit = fit_head(initial_head, data, with_params(spec, params), phase, report, cb.should_stop)
        finite = math.isfinite(fit.val_loss)
        state = "pruned" if fit.pruned else "complete" if finite else "diverged"
        row = SearchTrial(number=trial.number, params=params, state=state, val_loss=fit.val_loss if finite else None,
                          val_acc=fit.val_acc if finite else None, best_epoch=fit.best_epoch or None,
                          epochs=fit.epochs, seconds=round(time.perf_counter() - tt, 4), spec_values=trial.number == 0)
        if state == "complete" and all(t.state != "complete" or fit.val_loss < (t.val_loss or math.inf) for t in trials):
            best_head.clear()
            best_head.update(fit.head_state)
        trials.append(row)
        cb.on_message(f"search trial {trial.number + 1}/{n}: " + ", ".join(f"{k} {v:.3g}" for k, v in params.items())
                      + (f": val loss {fit.val_loss:.4f}, acc {fit.val_acc:.3f}" if finite else ": val loss diverged")
                      + f" after {fit.epochs} epoch(s)" + (" (pruned)" if fit.pruned else ""))
        if on_trial is not None:
            on_trial(len(trials), n)
        if state != "complete":
            raise optuna.TrialPruned()
        return fit.val_loss

    study.optimize(objective, n_trials=n, timeout=spec.search.timeout_s, catch=())
    done = [t for t in trials if t.state == "complete"]
    if not done:  # every trial diverged (trial 0 is never pruned): the spec's own values stand
        cb.on_message("no trial of the search converged: training with the spec's own values")
        return SearchReport(trials_asked=n, trials=trials, best_params=trials[0].params if trials else {},
                            space={k: [lo, hi, "log" if lg else "linear"] for k, (lo, hi, lg) in ranges.items()},
                            seconds=round(time.perf_counter() - t0, 3), timed_out=len(trials) < n, lr_find=[]), None
    best = min(done, key=lambda t: (t.val_loss or math.inf, t.number))
    report = SearchReport(trials_asked=n, trials=trials, best_trial=best.number, best_params=best.params,
                          best_val_loss=best.val_loss, best_val_acc=best.val_acc,
                          space={k: [lo, hi, "log" if lg else "linear"] for k, (lo, hi, lg) in ranges.items()},
                          seconds=round(time.perf_counter() - t0, 3),
                          timed_out=len(trials) < n)
    return report, best_head


# ---------------------------------------------------------------- the search within a run


class TunableRun(Protocol):
    """What `tune` reads from and sets on a run (Runner): its spec and phases are replaced by the tuned ones."""

    spec: RunSpec
    phases: list[freeze.Phase]

    @property
    def model(self) -> Any: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def amp_dtype(self) -> torch.dtype | None: ...
    @property
    def cb(self) -> Callbacks: ...
    @property
    def use_feature_cache(self) -> bool: ...
    @property
    def train_feats(self) -> list[torch.Tensor]: ...
    @property
    def val_feats(self) -> torch.Tensor: ...
    @property
    def train_labels(self) -> list[int]: ...
    @property
    def val_labels(self) -> list[int]: ...
    @property
    def class_weights(self) -> Weighting: ...

    def batch_size(self, on_features: bool) -> int: ...

    def train_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


def _peak_mult(phase: freeze.Phase) -> float:
    """The highest of a phase's learning-rate multipliers (its lr_scale included): the head's."""
    return phase.lr_scale * max(phase.lr_mults.get(g, 1.0) for g in phase.trainable)


def _range_test(run: TunableRun, spec: RunSpec, phase: freeze.Phase, head: dict | None,
                progress: Callable[..., None], eta_after: Callable[[], float]) -> LrRangeTest:
    """The range test of `phase` under `spec` (the searched parameters), with the searched head in place when
    there is one (`head`); the model's head is put back after."""
    assert spec.search is not None
    before = {k: v.detach().clone() for k, v in run.model.head.state_dict().items()}
    if head is not None:
        run.model.head.load_state_dict(head)
    t = time.perf_counter()
    try:
        rt = lr_range_test(run.model, phase, run.train_batches, optimizer=spec.optimizer,
                           weight_decay=spec.weight_decay, label_smoothing=spec.effective_label_smoothing(),
                           class_weights=run.class_weights, amp_dtype=run.amp_dtype,
                           steps=spec.search.range_test_steps, should_stop=run.cb.should_stop)
    finally:
        run.model.head.load_state_dict(before)
    progress("lr_find", 0, 1, 1, t, eta_after())
    chosen = rt.lr if rt.lr is not None else spec.effective_lr() * _peak_mult(phase)  # else the spec's rate
    run.cb.on_message(
        f"learning-rate range test of phase {phase.name}: " + (
            f"lr {chosen:.3g} (a tenth of {rt.lr_min_loss:.3g}, where the smoothed loss was lowest; steepest descent "
            f"at {rt.lr_steepest:.3g})" if rt.lr is not None else
            f"the loss never descended over {len(rt.lrs)} step(s): keeping lr {chosen:.3g}"))
    return LrRangeTest(phase=phase.name, lrs=rt.lrs, losses=rt.losses, lr=chosen, lr_min_loss=rt.lr_min_loss,
                       lr_steepest=rt.lr_steepest, rule="min_loss/10" if rt.lr is not None else "kept",
                       diverged=rt.diverged, steps=len(rt.lrs), seconds=round(rt.seconds, 3))


def _search(run: TunableRun, progress: Callable[..., None], eta_after: Callable[[], float]) -> SearchReport:
    spec = run.spec
    assert spec.search is not None
    t = time.perf_counter()
    frozen = [p for p in run.phases if p.backbone_frozen]
    head = None
    if frozen and run.use_feature_cache:
        data = HeadData(run.train_feats, run.train_labels, run.val_feats, run.val_labels, run.class_weights,
                        run.batch_size(True), run.device)
        report, head = search_head(spec, frozen[0], data, run.model.head, run.cb,
                                   lambda done, n: progress("search", 0, done, n, t, eta_after()))
    else:
        run.cb.on_message(f"{spec.strategy} trains no head on cached features: the search is the learning-rate "
                          "range test")
        report = SearchReport(trials_asked=0, trials=[], best_params={}, space={}, lr_find=[])
    tuned = with_params(spec, report.best_params)
    if "lr" in spec.search.params:
        report.lr_find = [_range_test(run, tuned, p, head, progress, eta_after)
                          for p in run.phases if not p.backbone_frozen]
    report.seconds = round(time.perf_counter() - t, 3)
    return report


def apply(run: TunableRun, report: SearchReport) -> None:
    """Make the run train with what the search chose: its spec with the best parameters (as if they had been
    given), the unfrozen phases' learning rates from their range tests, and the head's dropout."""
    spec = with_params(run.spec, report.best_params)
    chosen = {rt.phase: rt.lr for rt in report.lr_find}
    first = run.phases[0]
    if first.name in chosen:  # finetune_last:N, full: the range test's rate is the run's
        spec = spec.model_copy(update={"lr": chosen.pop(first.name) / _peak_mult(first)})
    base = spec.effective_lr()
    run.phases = [dataclasses.replace(p, lr_scale=p.lr_scale * chosen[p.name] / (base * _peak_mult(p)))
                  if p.name in chosen else p for p in run.phases]
    set_dropout(run.model.head, spec.dropout)
    run.spec = spec


def tune(run: TunableRun, progress: Callable[..., None], saved: dict | None = None,
         eta_after: Callable[[], float] = lambda: 0.0) -> SearchReport | None:
    """With spec.search: search the run's parameters (once: a resumed run reads the search it ran from its
    checkpoint, `saved`) and make the run train with them (`apply`). Returns the search's report, or None.
    `eta_after()`: the seconds the training will take after the search (for the progress bar)."""
    spec = run.spec
    if spec.search is None:
        return None
    report = SearchReport.from_stored(saved)
    if report is not None:
        run.cb.on_message(f"the search of the interrupted run: {len(report.trials)} trial(s), best "
                          f"{report.best_params}")
    else:
        report = _search(run, progress, eta_after)
        if report.trials:
            torch.manual_seed(spec.seed)  # the head phase starts as every trial did: it repeats the best one
    apply(run, report)
    return report
