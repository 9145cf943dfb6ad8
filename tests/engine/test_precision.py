"""The mixed-precision choice (worker/engine/device.py): bf16 autocast on GPUs that have it, fp16 (with a
GradScaler in the runner) on those that do not, float32 on the CPU or when the spec turns it off. The GPU's
answer to "bf16?" is the only thing stood in for: this machine has no GPU."""
from __future__ import annotations

import pytest
import torch

from worker.engine.device import amp_dtype_for, autocast

CUDA = torch.device("cuda")


@pytest.mark.parametrize("bf16,want", [(True, torch.bfloat16), (False, torch.float16)])
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_gpus_get_bf16_where_they_have_it_else_fp16(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert amp_dtype_for(CUDA, True) is want
    assert amp_dtype_for(CUDA, False) is None  # mixed_precision off: float32
    ac = autocast(CUDA, want)
    assert ac.device == "cuda" and ac.fast_dtype is want  # (disabled here, with a warning: no CUDA)


def test_the_cpu_stays_in_float32():
    cpu = torch.device("cpu")
    assert amp_dtype_for(cpu, True) is None and amp_dtype_for(cpu, False) is None
    ac = autocast(cpu, None)
    assert not ac._enabled
    with ac:
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32
