"""torch.compile for the forward passes that dominate a job on a GPU (issue 18): the train steps on images and
the frozen backbone's feature extraction. Everything else (validation, calibration, heatmaps, exports) runs
the plain module: compiling them would cost more than it saves, and hooks (Grad-CAM) stay simple.

The settings (like GRAFT_GPU_DECODE, not part of a RunSpec: they change how fast, not what, a run trains):
- GRAFT_COMPILE: `off` (the default) or `on`. Compiling costs tens of seconds to minutes at a job's start (and
  again for the last, smaller batch and at each train/eval switch), and pays only when the job runs many steps
  afterwards: bench/gpu.py measures whole jobs both ways; until a GPU measurement says it pays by default, it
  is a choice made per worker.
- GRAFT_COMPILE_BACKEND: torch.compile's backend, `inductor` by default (`aot_eager` traces without generating
  code: what the tests use on the CPU).
The compiled modules share their parameters with the model: checkpoints, the optimizer and the out-of-memory
retry see the same tensors.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .device import env_choice

ENV, BACKEND_ENV = "GRAFT_COMPILE", "GRAFT_COMPILE_BACKEND"


def compile_enabled() -> bool:
    """GRAFT_COMPILE: on or off (the default); an unknown value counts as off (and says so)."""
    return env_choice(ENV, ("on", "off"), "off", "off", "not compiling") == "on"


def backend() -> str:
    return os.environ.get(BACKEND_ENV, "").strip() or "inductor"


class Compiled:
    """The model's compiled forwards, made on first use when GRAFT_COMPILE=on (else the plain modules)."""

    def __init__(self, model: Any):
        self.model, self.enabled = model, compile_enabled()
        self._train: Any = None
        self._body: Any = None

    def describe(self) -> str | None:
        """A line for the job's log when compiling, else None."""
        if not self.enabled:
            return None
        return (f"compiling the model (torch.compile, backend {backend()}, {ENV}=on): the first batches of each "
                "stage take longer")

    def train(self) -> Any:
        """The whole model, for train steps on images."""
        if not self.enabled:
            return self.model
        if self._train is None:
            self._train = torch.compile(self.model, backend=backend())
        return self._train

    def body(self) -> Any:
        """The backbone alone, for feature extraction."""
        body = self.model.body
        if not self.enabled:
            return body
        if self._body is None:
            self._body = torch.compile(body, backend=backend())
        return self._body
