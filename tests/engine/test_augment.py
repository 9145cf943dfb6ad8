"""Augmentation on whole batches (worker/engine/augment.py), checked on the CPU against torchvision's per-image
transforms: the crop's resize, the flip and each colour step; the setting; and a run that trains through it."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from worker.engine import augment as A
from worker.engine.data import ImageStore, image_loader, train_augmentation, train_transform
from worker.engine.device import seed_everything


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth uint8 image (gradients and a blob): resizes of it compare well between samplers."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(3, generator=g) * 6
    chans = [(torch.sin(3 * xx + phase[c]) * torch.cos(2 * yy - phase[c]) + 1) * 127 for c in range(3)]
    return torch.stack(chans).round().to(torch.uint8)


def _params(h: int, w: int, flip: bool = False, jitter=(1.0, 1.0, 1.0, 0.0)) -> torch.Tensor:
    return torch.tensor([h, w, float(flip), *jitter])


@pytest.mark.parametrize("crop,size", [((60, 80), 112), ((150, 120), 112), ((100, 100), 100)])
def test_the_crops_resize_matches_torchvisions_antialiased_resize(crop, size):
    img = _image(*crop)
    aug = A.BatchAugment("light", size)
    x = img.unsqueeze(0)
    out = aug.apply(x, _params(*crop).unsqueeze(0))
    ref = F.resize(img.float(), [size, size], antialias=True)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    diff = (out[0] - ref).abs()
    assert diff.mean() < 1.5 and diff.max() < 16, (diff.mean(), diff.max())
    if crop == (size, size):  # the same size: every sample falls on a pixel's centre
        assert diff.max() < 1e-3


def test_crops_of_different_sizes_in_one_padded_batch_are_each_resized_alone():
    imgs = [_image(90, 70, 1), _image(40, 120, 2)]
    aug = A.BatchAugment("light", 64)
    batch = [((im, _params(im.shape[1], im.shape[2], flip=k == 1)), k) for k, im in enumerate(imgs)]
    (x, params, order), y = aug.collate(batch)
    assert x.shape == (2, 3, 90, 120) and y.tolist() == [0, 1]
    out = aug.apply(x, params, order)
    alone = [aug.apply(im.unsqueeze(0), p.unsqueeze(0))[0] for (im, p), _ in batch]
    assert torch.allclose(out[0], alone[0], atol=1e-3)
    assert torch.allclose(out[1], alone[1], atol=1e-3)  # the padding never leaks into a crop
    unflipped = aug.apply(imgs[1].unsqueeze(0), _params(40, 120).unsqueeze(0))[0]
    assert torch.allclose(out[1], unflipped.flip(-1), atol=1e-3)


def test_each_colour_step_matches_torchvision_with_a_factor_per_image():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 16) * 255
    f = torch.tensor([0.7, 1.0, 1.2, 1.3])
    for mine, ref in [(A.brightness, F.adjust_brightness), (A.contrast, F.adjust_contrast),
                      (A.saturation, F.adjust_saturation)]:
        want = torch.stack([ref(x[i] / 255, float(f[i])) * 255 for i in range(4)])
        assert (mine(x.clone(), f) - want).abs().max() < 1e-2, mine.__name__
    turns = torch.tensor([-0.02, 0.0, 0.01, 0.3])
    want = torch.stack([F.adjust_hue(x[i] / 255, float(turns[i])) * 255 for i in range(4)])
    assert (A.hue(x.clone(), turns) - want).abs().max() < 0.05


def test_sampling_follows_the_preset_and_the_seed():
    img = _image(64, 96)
    aug = A.BatchAugment("standard", 48)
    seed_everything(3)
    first = [aug.sample(img) for _ in range(200)]
    seed_everything(3)
    again = [aug.sample(img) for _ in range(200)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))
    prm = torch.stack([p for _, p in first])
    areas = prm[:, 0] * prm[:, 1] / (64 * 96)
    assert areas.min() >= 0.2 - 0.02 and areas.max() <= 1.0 and areas.std() > 0.1
    assert 0.3 < prm[:, 2].mean() < 0.7  # flips
    assert prm[:, 3:6].min() >= 0.7 and prm[:, 3:6].max() <= 1.3 and prm[:, 6].abs().max() <= 0.02
    assert all(c.shape[1:] == (int(p[0]), int(p[1])) for c, p in first)
    assert all(c.shape[1] <= 64 * 4 / 3 + 1 and c.shape[2] <= 64 * 4 / 3 + 1 for c, _ in first)
    light = torch.stack([p for _, p in (A.BatchAugment("light", 48).sample(img) for _ in range(50))])
    assert torch.equal(light[:, 3:6], torch.ones(50, 3)) and torch.equal(light[:, 6], torch.zeros(50))


def test_the_setting_picks_the_path(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.delenv(A.ENV, raising=False)
    assert not isinstance(train_augmentation("standard", 32, cpu), A.BatchAugment)  # auto: the GPU only
    assert A.use_batch_path("standard", torch.device("cuda"))
    monkeypatch.setenv(A.ENV, "on")
    assert isinstance(train_augmentation("light", 32, cpu), A.BatchAugment)
    assert not isinstance(train_augmentation("none", 32, cpu), A.BatchAugment)  # a centre crop stays per image
    monkeypatch.setenv(A.ENV, "off")
    assert not A.use_batch_path("standard", torch.device("cuda"))
    monkeypatch.setenv(A.ENV, "sometimes")
    assert not A.use_batch_path("standard", torch.device("cuda"))
    assert "GRAFT_GPU_AUGMENT='sometimes' is not one of auto, on, off" in caplog.text
    with pytest.raises(ValueError, match="no batch augmentation for preset 'none'"):
        A.BatchAugment("none", 32)
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        train_transform("heavy", 32)


def test_the_loader_gives_augmented_batches_like_the_per_image_path(tmp_path, monkeypatch):
    """Both paths over the same store: batches of the same shape and labels, pixel statistics alike."""
    from PIL import Image

    from worker.engine.backbones import get_info

    paths = []
    for k in range(12):
        p = tmp_path / f"{k}.png"
        Image.fromarray(_image(40 + 3 * k, 60, k).permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    pre = get_info("efficientnet_lite0").preprocessing.with_size(32)
    store = ImageStore(paths, pre, threads=1)
    cpu = torch.device("cpu")
    monkeypatch.setenv(A.ENV, "on")
    batch_path = image_loader(store, list(range(12)), list(range(12)), train_augmentation("standard", 32, cpu),
                              5, True, cpu)
    per_image = image_loader(store, list(range(12)), list(range(12)), train_transform("standard", 32), 5, True, cpu)
    assert len(batch_path) == len(per_image) == 3
    seed_everything(0)
    got = list(batch_path)
    assert [len(y) for _, y in got] == [5, 5, 2]
    assert sorted(torch.cat([y for _, y in got]).tolist()) == list(range(12))
    ref = torch.cat([x for x, _ in per_image]).float()
    mine = torch.cat([x for x, _ in got])
    assert mine.shape == ref.shape == (12, 3, 32, 32)
    assert abs(mine.mean() - ref.mean()) < 12 and mine.min() >= 0 and mine.max() <= 255


def test_a_full_run_trains_through_the_batch_path(tiny_slice, tmp_path, monkeypatch):
    """A real `full` run with the batch path (GRAFT_GPU_AUGMENT=on, here on the CPU): the body's weights move,
    and the same seed gives the same run again."""
    from domain.spec import RunSpec
    from worker.engine.backbones import build_model
    from worker.engine.modelfile import load_model
    from worker.engine.runner import run

    monkeypatch.setenv(A.ENV, "on")
    spec = RunSpec(strategy="full", epochs=1, image_size=64, batch_size=4, augment="standard")
    first = run(spec, tiny_slice, tmp_path / "a", None)
    again = run(spec, tiny_slice, tmp_path / "b", None)
    model, _ = load_model(first.model_path)
    ref = build_model("efficientnet_lite0", 2, pretrained=True)
    assert not torch.equal(model.body.conv_stem.weight, ref.body.conv_stem.weight)
    assert first.history[0].train_loss == again.history[0].train_loss
    assert first.history[0].images_per_s > 0
