"""Where the engine runs and its random state: the device (and, in a worker's pool child, which GPU and what
share of it), CPU threads, seeding, saving and restoring every RNG (for checkpoints and the out-of-memory
retry), and recognising an out-of-memory error."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def env_choice(name: str, choices: tuple[str, ...], default: str, fallback: str, then: str) -> str:
    """A worker setting read from the environment variable `name`, one of `choices` (case and spaces ignored;
    empty: `default`); an unknown value is taken as `fallback`, with a warning that ends in `then` (what
    happens instead)."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        log.warning("%s=%r is not one of %s: %s", name, value, ", ".join(choices), then)
        return fallback
    return value


def pick_device(device: str | None = None) -> torch.device:
    """The device named (default: cuda when available); on CUDA, cudnn benchmark mode on (use_cudnn_benchmark)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cudnn_benchmark(dev)
    return dev


def use_cudnn_benchmark(device: torch.device) -> None:
    """cudnn picks the fastest convolution algorithms for each input shape it meets (timed once per shape):
    the engine feeds fixed shapes (the crop size, a fixed batch but the last), so on CUDA it pays from the
    first epoch on. Nothing is touched on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# several jobs on one GPU (GRAFT_JOBS_PER_GPU): the share of its GPU's memory each of them may take, all of them
# together leaving a little for the CUDA contexts
GPU_MEMORY_SHARE = 0.95


def gpu_for_child(index: int, gpus: int) -> int | None:
    """The GPU a worker's pool child `index` (0, 1, ...) runs its jobs on: index modulo the host's `gpus`, so
    that children spread evenly over them; None without a GPU."""
    return index % gpus if gpus > 0 else None


def memory_fraction(jobs_per_gpu: int) -> float | None:
    """The share of its GPU's memory one of `jobs_per_gpu` jobs may allocate; None for one job per GPU (no cap)."""
    return GPU_MEMORY_SHARE / jobs_per_gpu if jobs_per_gpu > 1 else None


def use_gpu(index: int, gpus: int, jobs_per_gpu: int) -> torch.device | None:
    """In a worker's pool child `index`: make GPU gpu_for_child(index, gpus) this process's CUDA device (the
    engine's "cuda" then means it) and, with several jobs per GPU, cap what this process may allocate on it at
    memory_fraction(jobs_per_gpu), so that one job cannot starve the others (a job past its share gets an
    out-of-memory error, which the engine retries with smaller micro-batches). Nothing is touched without a
    GPU: None."""
    gpu = gpu_for_child(index, gpus)
    if gpu is None:
        return None
    dev = torch.device("cuda", gpu)
    torch.cuda.set_device(dev)
    share = memory_fraction(jobs_per_gpu)
    if share is not None:
        torch.cuda.set_per_process_memory_fraction(share, dev)
    return dev


def free_gpu_bytes(device: torch.device) -> int:
    """The memory free on `device` now, for every process (what this process's allocator keeps cached from an
    earlier job is handed back first: it would be free for the next one)."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


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


def rng_state() -> dict:
    """The state of every RNG an epoch draws from (torch, numpy, python, and CUDA when there)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_oom(e: BaseException) -> bool:
    """Out of GPU memory (or, on CPU, an allocation that failed)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def cpu_copy(obj):
    """A deep copy with every tensor on the CPU (a state dict's tensors are the live ones)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision on CUDA when `amp_dtype` is set; otherwise a disabled autocast (the same float32 code)."""
    if amp_dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=amp_dtype)


def amp_dtype_for(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """bfloat16 where the GPU has it, else float16 (which needs a GradScaler); None on CPU or when off."""
    if device.type == "cuda" and mixed_precision:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
