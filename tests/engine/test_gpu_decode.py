"""Tests for worker/engine/gpu_decode.py on a CPU-only machine: the device selection says no CUDA, the fallback
gives exactly the CPU path's tensors (and errors), the GPU path's own steps (which files it takes, batched
decode_jpeg, the resize) run on CPU tensors, and cudnn benchmark mode is left alone on the CPU."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domain.errors import ImageError
from worker.engine import gpu_decode
from worker.engine.backbones import Preprocessing
from worker.engine.data import ImageStore, decode_for
from worker.engine.device import pick_device, use_cudnn_benchmark
from worker.engine.gpu_decode import decode_device, decode_files, gpu_decode_mode, gpu_jpeg_bytes, resize_size

PRE = Preprocessing(image_size=24, resize_size=28)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")


def _gradient(size=(64, 48)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    a = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                        np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(a.astype(np.uint8))


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {"jpeg": tmp_path / "a.jpg", "png": tmp_path / "b.png", "gray": tmp_path / "c.jpg",
           "rotated": tmp_path / "d.jpg", "cmyk": tmp_path / "e.jpg", "corrupt": tmp_path / "f.jpg",
           "truncated": tmp_path / "g.jpg", "png_named_jpg": tmp_path / "h.jpg"}
    img = _gradient()
    img.save(out["jpeg"], quality=95)
    img.save(out["png"])
    img.convert("L").save(out["gray"], quality=95)
    exif = Image.Exif()
    exif[gpu_decode.EXIF_ORIENTATION] = 6  # rotated 90 degrees: the CPU path turns it upright
    img.save(out["rotated"], quality=95, exif=exif)
    img.convert("CMYK").save(out["cmyk"], quality=95)
    out["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG \xff\xd9")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    img.save(out["png_named_jpg"], "PNG")
    return out


def _cpu(p: Path) -> torch.Tensor:
    return decode_for(p, PRE)


def _cpu_error(p: Path) -> str:
    with pytest.raises(ImageError) as e:
        decode_for(p, PRE)
    return str(e.value)


# ---------------------------------------------------------------- which device


@no_cuda
@pytest.mark.parametrize("mode", ["auto", "on", "off", ""])
@pytest.mark.parametrize("device", [None, "cpu", "cuda", torch.device("cuda", 0)])
def test_no_cuda_means_the_cpu_path(monkeypatch, mode, device):
    monkeypatch.setenv("GRAFT_GPU_DECODE", mode)
    assert decode_device(device) is None


def test_the_setting(monkeypatch, caplog):
    monkeypatch.delenv("GRAFT_GPU_DECODE", raising=False)
    assert gpu_decode_mode() == "auto"
    monkeypatch.setenv("GRAFT_GPU_DECODE", " ON ")
    assert gpu_decode_mode() == "on"
    monkeypatch.setenv("GRAFT_GPU_DECODE", "sometimes")
    assert gpu_decode_mode() == "off"
    assert "GRAFT_GPU_DECODE" in caplog.text


def test_off_never_asks_cuda(monkeypatch):
    monkeypatch.setenv("GRAFT_GPU_DECODE", "off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("asked for CUDA"))
    assert decode_device("cuda") is None


def test_auto_keeps_the_cpu_for_a_cpu_run(monkeypatch):
    """Even where CUDA can decode, `auto` leaves a CPU run (or a caller naming no device) on the CPU path."""
    monkeypatch.setenv("GRAFT_GPU_DECODE", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "gpu_decode_works", lambda d: pytest.fail("tried the GPU"))
    assert decode_device("cpu") is None
    assert decode_device(None) is None


def test_a_gpu_that_cannot_decode_means_the_cpu_path(monkeypatch):
    monkeypatch.setenv("GRAFT_GPU_DECODE", "on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "gpu_decode_works", lambda d: False)
    assert decode_device("cuda:1") is None


# ---------------------------------------------------------------- the fallback: exactly the CPU path


@no_cuda
def test_fallback_is_exactly_the_cpu_path(files, monkeypatch):
    monkeypatch.setenv("GRAFT_GPU_DECODE", "on")
    names = ["jpeg", "png", "gray", "rotated", "cmyk", "corrupt", "truncated", "png_named_jpg"]
    got = decode_files([files[n] for n in names], PRE, _cpu, decode_device("cuda"))
    for n, r in zip(names, got):
        if n in ("corrupt", "truncated"):
            assert isinstance(r, ImageError) and str(r) == _cpu_error(files[n]), n
        else:
            assert isinstance(r, torch.Tensor) and torch.equal(r, _cpu(files[n])), n
    rotated = got[names.index("rotated")]
    assert min(rotated.shape[1:]) == PRE.resize_size and rotated.shape[1] > rotated.shape[2]  # turned upright


@no_cuda
def test_store_with_gpu_decode_on_matches_off_on_a_cpu_machine(files, monkeypatch):
    paths = list(files.values())
    monkeypatch.setenv("GRAFT_GPU_DECODE", "off")
    off = ImageStore(paths, PRE, device="cuda")
    monkeypatch.setenv("GRAFT_GPU_DECODE", "on")
    on = ImageStore(paths, PRE, device="cuda")
    assert on.errors == off.errors and set(on.errors) == {paths.index(files["corrupt"]),
                                                          paths.index(files["truncated"])}
    for i in range(len(paths)):
        if i not in off.errors:
            assert torch.equal(on.get(i), off.get(i))


# ---------------------------------------------------------------- the GPU path's steps, on CPU tensors


def test_which_files_the_gpu_takes(files, tmp_path):
    assert gpu_jpeg_bytes(files["jpeg"]) is not None
    for n in ("png", "gray", "rotated", "cmyk", "corrupt", "truncated", "png_named_jpg"):
        assert gpu_jpeg_bytes(files[n]) is None, n
    assert gpu_jpeg_bytes(files["jpeg"], max_pixels=64 * 48 - 1) is None  # over the limit: the CPU path refuses it
    assert gpu_jpeg_bytes(tmp_path / "missing.jpg") is None


def test_resize_size_is_the_cpu_paths():
    for w, h in [(64, 48), (48, 64), (500, 375), (28, 28), (1000, 29), (3, 3000)]:
        out = decode_for_size(w, h)
        assert resize_size(h, w, PRE.resize_size) == out, (w, h)


def decode_for_size(w: int, h: int) -> tuple[int, int]:
    from domain.images import resize_short

    r = resize_short(Image.new("RGB", (w, h)), PRE.resize_size)
    return r.size[1], r.size[0]


def test_the_device_path_run_on_cpu_tensors(files, monkeypatch):
    """decode_files with a device runs the GPU path's code; on CPU tensors here (decode_jpeg takes device="cpu"):
    the JPEG comes out the CPU path's shape with close pixels, every other file exactly as the CPU path."""
    names = ["jpeg", "png", "gray", "rotated", "corrupt", "jpeg"]
    got = decode_files([files[n] for n in names], PRE, _cpu, "cpu", batch=1)
    for n, r in zip(names, got):
        if n == "corrupt":
            assert isinstance(r, ImageError) and str(r) == _cpu_error(files[n])
        elif n == "jpeg":
            ref = _cpu(files[n])
            assert isinstance(r, torch.Tensor) and r.dtype == torch.uint8 and r.shape == ref.shape
            assert (r.float() - ref.float()).abs().mean() < 3
        else:
            assert isinstance(r, torch.Tensor) and torch.equal(r, _cpu(files[n])), n


def test_a_failed_gpu_batch_goes_to_the_cpu_path(files, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("nvjpeg says no")

    monkeypatch.setattr(gpu_decode, "decode_jpeg_batch", broken)
    got = decode_files([files["jpeg"], files["png"]], PRE, _cpu, "cpu")
    assert torch.equal(got[0], _cpu(files["jpeg"])) and torch.equal(got[1], _cpu(files["png"]))
    assert "nvjpeg says no" in caplog.text


# ---------------------------------------------------------------- cudnn benchmark mode


def test_cudnn_benchmark_untouched_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert pick_device("cpu").type == "cpu"
    use_cudnn_benchmark(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    use_cudnn_benchmark(torch.device("cuda"))  # only sets the flag: no GPU needed
    assert torch.backends.cudnn.benchmark is True


def test_store_wiring_through_the_device_path(files, monkeypatch):
    """ImageStore with a decode device (faked: the device path on CPU tensors) keeps the CPU path's errors, shapes
    and, for every file not taken by the device path, its exact tensors."""
    from worker.engine import data

    paths = list(files.values())
    ref = ImageStore(paths, PRE)
    monkeypatch.setattr(data, "decode_device", lambda device: torch.device("cpu"))
    got = ImageStore(paths, PRE, device="cuda")
    assert got.errors == ref.errors
    for i, p in enumerate(paths):
        if i in ref.errors:
            continue
        assert got.get(i).shape == ref.get(i).shape
        if gpu_jpeg_bytes(p) is None:
            assert torch.equal(got.get(i), ref.get(i)), p.name
