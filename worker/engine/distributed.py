"""Data-parallel training: `spec.devices` processes, one per device, with torch.distributed and
DistributedDataParallel (backend nccl on CUDA, gloo on CPU), giving the results of one device at the same
global batch size, up to floating-point tolerance.

How the ranks stay equal to one device, and to each other:
- Every rank runs the same Runner (`Runner.run`, the one loop) with the overrides of `_RankMixin`. Every rank
  iterates the same global batches (rank 0's torch RNG state is broadcast at the start of every epoch, so the
  shuffled order and the augmentation draws agree) and trains on its part of each micro-batch
  (`loop.train_epoch_on_images(shard=...)`); the loss is scaled so that the gradients DDP averages are those
  of the whole batch.
- BatchNorm layers that train use the statistics of the whole (micro-)batch over all ranks (`_global_batch_norm`,
  a cross-rank batch norm with autograd through the all-reduce), as one device would; torch's
  SyncBatchNorm would do the same but runs on GPUs only. Frozen layers stay in eval mode, as on one device.
- Only rank 0 computes the frozen-backbone features and the val logits; it broadcasts them, so every decision
  taken on val loss (best epoch, early stopping) is the same on every rank. Frozen-backbone phases (the head
  on cached features: fractions of a second) are not split: every rank trains the same head on the same
  features, with no communication. A run whose phases all train the head only (strategy "features") does not
  come here at all: `runner.run` runs it in one process.
- Dropout: each rank draws masks for its own images, so with dropout > 0 a run equals one device in
  distribution, not to the bit.

Only rank 0 reports (through a queue to the parent process, which calls the real callbacks: those of the
worker cannot cross processes) and writes checkpoints and the model file; the other ranks write nothing where
the run's outputs go. A stop request (the parent polls `should_stop` and sets a shared Event) is one decision
of all ranks, taken after a training batch or an epoch (an all-reduce), so that every rank stops at the same
step. Out of GPU memory is not retried with smaller micro-batches here (the ranks would disagree): it fails
the run, which says to lower the batch size.
"""
from __future__ import annotations

import datetime as dt
import functools
import gc
import logging
import os
import pickle
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from domain.callbacks import CallbackList, Callbacks
from domain.errors import SpecError
from domain.images import DEFAULT_MAX_PIXELS
from domain.spec import RunSpec

from . import freeze
from .checkpoint import load_checkpoint
from .data import train_augmentation
from .device import pick_device
from .loop import micro_batch, train_epoch_on_images
from .result import RunResult

log = logging.getLogger(__name__)

COLLECTIVE_STAGES = ("train", "epoch")  # the events every rank reaches in step: where a stop is decided
RANK_TIMEOUT = dt.timedelta(hours=2)  # a collective waiting this long fails (rank 0 decoding alone, say)


# ---------------------------------------------------------------- in the ranks


class _Shard:
    """loop.Shard: rank `rank` of `world` takes the rank-th of `world` near-equal slices of each micro-batch."""

    def __init__(self, rank: int, world: int, group: Any):
        self.rank, self.world, self.group = rank, world, group

    def part(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.world)[self.rank]

    def total(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()


class _AllReduceSum(torch.autograd.Function):
    """The sum over all ranks, differentiable: the gradient of each rank's input is the sum of the gradients
    of every rank's output (each rank's loss depends on every rank's input through it)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        g = grads[0].contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


def _global_batch_norm(group: Any, original: Any, input: torch.Tensor, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
                       eps: float = 1e-5) -> torch.Tensor:
    """F.batch_norm whose training statistics are those of the batch of all ranks together (what one device
    computes on the whole batch), gradients included; eval mode is F.batch_norm itself."""
    if not training:
        return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
    x = input.float()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.full((1,), float(x.numel() // max(x.shape[1], 1)), device=x.device)
    stats = _all_reduce(torch.cat([x.sum(dims), count]), group)
    n = stats[-1].detach()
    if n.item() <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    mean = stats[:-1] / n
    d = x - mean.view(shape)
    var = _all_reduce((d * d).sum(dims), group) / n
    out = d * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            unbiased = var.detach() * (n / (n - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out.to(input.dtype)


class _RankCallbacks(Callbacks):
    """A rank's callbacks: rank 0 sends every event to the parent process; the other ranks stay silent.
    `should_stop` is one decision of all ranks (an all-reduce of the parent's stop Event) where every rank is
    in step: after a training batch and after an epoch. Elsewhere (decoding, features, validation: rank 0
    alone, or not in step) it answers False, and a stop waits for the next training batch."""

    def __init__(self, events: Any, stop: Any, rank: int, group: Any):
        self.events = events if rank == 0 else None
        self.stop, self.group = stop, group
        self.stage = ""

    def _send(self, *item: Any) -> None:
        if self.events is not None:
            self.events.put(item)

    def on_start(self, info: dict[str, Any]) -> None:
        self._send("start", info)

    def on_message(self, message: str) -> None:
        self._send("message", message)

    def on_progress(self, p: Any) -> None:
        self.stage = p.stage
        self._send("progress", p)

    def on_epoch_end(self, m: Any) -> None:
        self.stage = "epoch"
        self._send("epoch", m)

    def on_checkpoint(self, path: Path, kind: str) -> None:
        self._send("checkpoint", str(path), kind)

    def should_stop(self) -> bool:
        if self.stage not in COLLECTIVE_STAGES:
            return False
        flag = torch.tensor([1 if self.stop.is_set() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


class _RankMixin:
    """The overrides that make a Runner one rank of a data-parallel run (mixed in before Runner)."""

    rank: int
    world: int
    group: Any  # gloo: CPU tensors and objects (the default group is nccl on CUDA)
    run_out: Path  # the run's output folder (rank 0's out; the other ranks write to a scratch folder)

    def setup_rank(self, rank: int, world: int, group: Any, run_out: Path) -> None:
        self.rank, self.world, self.group, self.run_out = rank, world, group, run_out
        self.shard = _Shard(rank, world, group)
        self._ddp: DistributedDataParallel | None = None
        self._ddp_phase: freeze.Phase | None = None

    def prepare(self) -> None:
        super().prepare()  # type: ignore[misc]
        me: Any = self
        if me.device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // self.world))

    def compute_features(self, progress: Any, need_images: bool = False) -> None:
        me: Any = self
        if self.rank == 0:
            super().compute_features(progress, need_images)  # type: ignore[misc]
        elif need_images:
            me._decode(progress)  # the same images: a later phase trains on them
        names = ("items", "train_idx", "val_idx", "train_labels", "val_labels", "skipped", "train_feats",
                 "val_feats", "feature_rate", "features_from_cache", "cache_hits", "feature_seconds")
        box = [{k: getattr(self, k, None) for k in names} if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        for k, v in (box[0] or {}).items():
            setattr(self, k, v)

    def _sync_rng(self) -> None:
        state = torch.get_rng_state()
        dist.broadcast(state, src=0, group=self.group)
        torch.set_rng_state(state)

    def _epoch_on_features(self, *args: Any, **kw: Any) -> Any:
        self._sync_rng()
        return super()._epoch_on_features(*args, **kw)  # type: ignore[misc]

    def _ddp_for(self, phase: freeze.Phase) -> DistributedDataParallel:
        """DDP over the model as the phase sets it (DDP syncs the parameters that require grad when it is
        built, and broadcasts rank 0's weights then)."""
        me: Any = self
        if self._ddp is None or self._ddp_phase is not phase:
            self._ddp = None
            gc.collect()  # the old wrapper's gradient hooks go with it
            ids = [me.device.index] if me.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(me.model, device_ids=ids)
            self._ddp_phase = phase
        return self._ddp

    def _epoch_on_images(self, phase: freeze.Phase, opt: Any, sched: Any, scaler: Any, epoch: int,
                         progress: Any, micro: int, keep_eval: bool) -> Any:
        me: Any = self
        self._sync_rng()
        model = self._ddp_for(phase)
        if keep_eval:
            me.model.eval()
        else:
            freeze.train_mode(me.model, phase)
        aug = train_augmentation(me.spec.augment, me.pre.image_size, me.device)
        loader = me._loader(me.train_idx, me.train_labels, aug, shuffle=True)

        def on_batch(done: int, n: int, t: float, seen: int) -> None:
            me.image_seconds = (time.perf_counter() - t) / seen
            progress("train", epoch, done, n, t, me._eta_after_epoch(epoch))

        return train_epoch_on_images(model, loader, opt, sched, scaler, me._inputs, me._autocast, micro, me.device,
                                     me.spec.effective_label_smoothing(), on_batch, shard=self.shard,
                                     class_weights=me.class_weights)

    def train_epoch_on_images(self, phase: freeze.Phase, opt: Any, sched: Any, scaler: Any, epoch: int,
                              progress: Any, validate: bool = True, keep_eval: bool = False) -> Any:
        me: Any = self
        micro = micro_batch(me.spec.batch_size, me.accum)  # of the global batch; each rank takes its part
        tl, ta, seen, secs = self._epoch_on_images(phase, opt, sched, scaler, epoch, progress, micro, keep_eval)
        return tl, ta, seen, secs, self.predict_val(False, epoch, progress, micro) if validate else None

    def predict_val(self, use_features: bool, epoch: int, progress: Any, micro: int | None = None) -> torch.Tensor:
        me: Any = self
        if self.rank == 0:
            logits = super().predict_val(use_features, epoch, progress, micro).clone()  # type: ignore[misc]
        else:
            logits = torch.empty(len(me.val_idx), len(me.classes))
        dist.broadcast(logits, src=0, group=self.group)
        return logits

    def _save_checkpoint(self, state: Any) -> None:
        if self.rank == 0:
            super()._save_checkpoint(state)  # type: ignore[misc]

    def _load_checkpoint(self) -> Any:
        me: Any = self
        return load_checkpoint(self.run_out / "checkpoints" / "last.pt", me.spec.model_dump(), me.classes)


def _watch_parent(parent: int) -> None:
    """A rank whose parent died (SIGKILL) exits instead of waiting for collectives forever."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _rank_main(rank: int, world: int, init: str, backend: str, base: type, spec: RunSpec, data_dir: str,
               out_dir: str, resume: bool, cache_dir: str | None, device_type: str, max_pixels: int,
               events: Any, stop: Any, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    scratch = None
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=RANK_TIMEOUT)
        group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        bn_group = dist.new_group()  # its own group: these all-reduces run inside forward and backward
        setattr(F, "batch_norm", functools.partial(_global_batch_norm, bn_group, F.batch_norm))  # noqa: B010
        out = Path(out_dir)
        if rank > 0:
            out = scratch = Path(tempfile.mkdtemp(prefix=f"graft-rank{rank}-"))
        cls = type("RankRunner", (_RankMixin, base), {})
        runner = cls(spec, data_dir, out, _RankCallbacks(events, stop, rank, group), resume,
                     cache_dir if rank == 0 else None, f"cuda:{rank}" if device_type == "cuda" else "cpu",
                     max_pixels=max_pixels)
        runner.setup_rank(rank, world, group, Path(out_dir))
        result = runner.run()
        if rank == 0:
            events.put(("result", result))
    except BaseException as e:
        events.put(("error", rank, _picklable(e), traceback.format_exc()))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- in the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _end(procs: list[Any], grace: float) -> None:
    """Wait up to `grace` seconds for the ranks to exit, then terminate (and at last kill) the others."""
    procs = [p for p in procs if p.pid is not None]  # started
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_distributed(base: type, spec: RunSpec, data_dir: str | Path, out_dir: str | Path,
                    callbacks: Callbacks | None = None, resume: bool = False, cache_dir: Any = None,
                    device: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> RunResult:
    """Run `base` (the Runner class) on `spec.devices` processes; this process relays their events to
    `callbacks` and their stop requests back, and returns rank 0's result."""
    world = spec.devices
    dev = pick_device(device)
    if dev.type == "cuda":
        have = torch.cuda.device_count()
        if have < world:
            raise SpecError(f"this run needs {world} devices; this machine has {have} GPU(s): lower devices")
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise SpecError(f"data-parallel training runs on CUDA or CPU, not {dev.type}")
    cb = CallbackList(callbacks)
    ctx = torch.multiprocessing.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    init = f"tcp://127.0.0.1:{_free_port()}"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_rank_main, name=f"graft-rank{r}", args=(
        r, world, init, backend, base, spec, str(data_dir), str(out_dir), resume,
        str(getattr(cache_dir, "root", cache_dir)) if cache_dir else None, dev.type, max_pixels, events, stop, os.getpid()))
        for r in range(world)]
    result: RunResult | None = None
    error: tuple | None = None
    label = f"{world}x {dev.type}"
    try:
        for p in procs:
            p.start()
        polled = 0.0
        while result is None and error is None:
            try:
                item = events.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                kind = item[0]
                if kind == "start":
                    cb.on_start({**item[1], "device": label})
                elif kind == "message":
                    cb.on_message(item[1])
                elif kind == "progress":
                    cb.on_progress(item[1])
                elif kind == "epoch":
                    cb.on_epoch_end(item[1])
                elif kind == "checkpoint":
                    cb.on_checkpoint(Path(item[1]), item[2])
                elif kind == "result":
                    result = item[1]
                elif kind == "error":
                    error = item[1:]
            now = time.monotonic()
            if not stop.is_set() and now - polled >= 0.2:
                polled = now
                if cb.should_stop():
                    stop.set()
            if item is None and result is None and error is None:
                gone = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
                if any(code != 0 for _, code in gone) or (procs and len(gone) == len(procs)):
                    r, code = next(((r, c) for r, c in gone if c != 0), gone[0])
                    error = (r, RuntimeError(f"training process {r} of {world} exited (code {code}) "
                                             "without a result"), "")
        _end(procs, 60.0 if error is None else 0.0)
    finally:
        _end(procs, 0.0)  # Ctrl-C, a callback that raised: no rank outlives the run
    if error is not None:
        rank, exc, tb = error
        if tb:
            log.error("training process %s of %s failed:\n%s", rank, world, tb)
        if isinstance(exc, torch.OutOfMemoryError):
            raise SpecError(f"out of GPU memory on device {rank} ({str(exc)[:200]}): lower batch_size or "
                            "image_size") from exc
        raise exc
    assert result is not None
    result.device = label
    return result
