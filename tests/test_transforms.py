"""Preprocessing presets, the per-image pipelines and the batched normalise + augment hot path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dala_model.models.transforms import (
    PRESETS,
    ROTATION_DEGREES,
    BatchAugment,
    eval_transform,
    normalize_batch,
    train_transform,
)


def _uint8_nhwc(n: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_paper_preset_maps_pixels_to_minus_one_one():
    assert PRESETS["paper"].mean == PRESETS["paper"].std == (0.5, 0.5, 0.5)
    x = _uint8_nhwc()
    x[0, 0, 0] = 0
    x[0, 0, 1] = 255
    out = normalize_batch(x, "paper")
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16)
    assert out.min() == -1.0 and out.max() == 1.0
    torch.testing.assert_close(out, x.permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def test_nhwc_and_nchw_give_the_same_batch_and_channels_last_is_honoured():
    x = _uint8_nhwc()
    from_nhwc = normalize_batch(x, "imagenet", channels_last=True)
    from_nchw = normalize_batch(x.permute(0, 3, 1, 2).contiguous(), "imagenet")
    torch.testing.assert_close(from_nhwc, from_nchw)
    assert from_nhwc.is_contiguous(memory_format=torch.channels_last)
    assert from_nchw.is_contiguous()
    reference = TF.normalize(
        x.permute(0, 3, 1, 2).float() / 255,
        list(PRESETS["imagenet"].mean),
        list(PRESETS["imagenet"].std),
    )
    torch.testing.assert_close(from_nchw, reference)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 8, 8, 3), r"needs a uint8 tensor .* got torch.float32 tensor"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"got torch.uint8 tensor of shape \(8, 8, 3\)"),
        (
            torch.zeros(2, 8, 8, 4, dtype=torch.uint8),
            r"3 colour channels in dim 1 \(NCHW\) or dim 3",
        ),
    ],
)
def test_normalize_batch_rejects_other_inputs(x, message):
    with pytest.raises(ValueError, match=message):
        normalize_batch(x, "paper")


def test_unknown_preset_is_named():
    with pytest.raises(
        ValueError, match=r"unknown preset 'raw'; choose one of \['imagenet', 'paper'\]"
    ):
        normalize_batch(_uint8_nhwc(), "raw")


def test_eval_transform_on_a_real_breakhis_image(breakhis_sample):
    png = next(iter(sorted(breakhis_sample.rglob("*.png"))))
    image = Image.open(png).convert("RGB")
    out = eval_transform("paper", 64)(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert -1.0 <= out.min() < out.max() <= 1.0
    # The same pixels as a uint8 tensor give the same result, and match the batched path.
    pixels = TF.pil_to_tensor(image)
    torch.testing.assert_close(eval_transform("paper", 64)(pixels), out, atol=1 / 127.5, rtol=0)
    resized = TF.resize(pixels, [64, 64], antialias=True)
    torch.testing.assert_close(
        normalize_batch(resized[None], "paper")[0], eval_transform("paper", 64)(resized)
    )


def test_train_transform_is_random_and_keeps_the_shape():
    pixels = torch.randint(
        0, 256, (3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    transform = train_transform("paper", 32)
    torch.manual_seed(0)
    first = transform(pixels)
    second = transform(pixels)
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)
    assert ROTATION_DEGREES == 20.0
    assert transform.transforms[-2].degrees == [-20.0, 20.0]


def test_batch_augment_identity_and_flip():
    x = torch.randn(3, 3, 8, 10)
    torch.testing.assert_close(BatchAugment(degrees=0, flip_p=0)(x), x)
    torch.testing.assert_close(BatchAugment(degrees=0, flip_p=1)(x), x.flip(-1))


@pytest.mark.parametrize(("angle", "size"), [(90.0, (8, 8)), (30.0, (8, 12)), (-15.0, (12, 8))])
def test_batch_augment_rotates_like_torchvision(angle, size):
    x = torch.randn(2, 3, *size)
    out = BatchAugment(degrees=(angle, angle), flip_p=0)(x)
    torch.testing.assert_close(
        out, TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR), atol=1e-5, rtol=0
    )


def test_batch_augment_draws_each_sample_independently_and_replays_with_a_seed():
    x = torch.randn(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    augment = BatchAugment()
    out = augment(x, generator=torch.Generator().manual_seed(3))
    assert all(not torch.allclose(out[i], out[j]) for i in range(8) for j in range(i + 1, 8))
    torch.testing.assert_close(
        augment(x, generator=torch.Generator().manual_seed(3)), out, atol=0, rtol=0
    )
    assert not torch.allclose(augment(x, generator=torch.Generator().manual_seed(4)), out)


def test_batch_augment_keeps_channels_last_and_checks_its_input():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert BatchAugment()(x).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"needs a float \(N, C, H, W\) batch"):
        BatchAugment()(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"flip_p=2 must be a probability"):
        BatchAugment(flip_p=2)
