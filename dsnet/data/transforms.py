"""Batched, deterministic image transforms in plain torch.

Two requirements shape this module:

* **Determinism.** A resumed run must see the same augmentations as an
  uninterrupted one, whatever the batch composition, worker count or rank. So
  no transform draws from a global RNG or a worker seed: every random number a
  sample uses is a pure function of ``(seed, epoch, index, view, slot)``
  (``sample_uniforms``, a counter-based splitmix64 hash), the moral equivalent
  of a per-sample generator seeded by ``(seed, epoch, index)`` but computed
  for a whole batch in one vectorised numpy call.
* **Speed on small CPUs.** The small datasets are augmented a batch at a time
  on tensors (gathers, ``affine_grid``/``grid_sample``, masked ops), not one
  PIL image at a time: a Fashion-MNIST epoch takes a couple of seconds.

Each sample's uniforms are laid out in fixed slots (``_SLOT_*``), so turning
one augmentation on or off does not change the random numbers the others see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dsnet.data.datasets import pil_to_tensor

__all__ = [
    "AugmentSpec",
    "BatchTransform",
    "augment_defaults",
    "sample_uniforms",
    "random_resized_crop_boxes",
    "RANDAUGMENT_OPS",
    "apply_randaugment_op",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

_SLOT_CROP = 0  # 10 attempts x (area, log-ratio, top, left) for the random resized crop; 2 for plain crops
_SLOT_FLIP = 40
_SLOT_ERASE = 41  # apply?, area, log-ratio, top, left
_SLOT_RANDAUG = 46  # per op: (which op, sign)
_RRC_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: the shorter side to size / 0.875, then the centre crop


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: Tensor | Sequence[int], view: int, num: int) -> Tensor:
    """``(len(indices), num)`` float64 uniforms in [0, 1), a pure function of (seed, epoch, index, view, slot).

    The same sample gets the same numbers in any batch, on any rank or worker,
    in any process: this is what makes augmentation reproducible on resume.
    """
    idx = np.asarray(indices.tolist() if isinstance(indices, Tensor) else list(indices), dtype=np.int64)
    with np.errstate(over="ignore"):
        key = np.array([seed & _MASK64], dtype=np.uint64)
        for part in (epoch, view):
            key = _splitmix(key + _GOLDEN) ^ np.array([part & _MASK64], dtype=np.uint64)
        key = _splitmix(key + _GOLDEN)
        per_sample = _splitmix(key ^ (idx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)))
        slots = np.arange(1, num + 1, dtype=np.uint64) * _GOLDEN
        z = _splitmix(per_sample[:, None] + slots[None, :])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation, resolved for one dataset (no ``None`` left)."""

    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    crop_padding: int = 0
    hflip: bool = False
    randaugment_n: int = 0
    randaugment_m: float = 9.0
    random_erasing: float = 0.0


def augment_defaults(dataset: str) -> dict:
    """The per-dataset defaults behind the ``None`` entries of ``data.augment`` for the known datasets.

    Small datasets get light augmentation (a shift by a few pixels, flips where
    they make sense). MNIST digits are not flipped (a flipped 2 is not a 2),
    nor are the synthetic templates (a flipped template is another pattern).
    Image folders get theirs from the data (``dsnet.data.recipe``); the entry
    here is the large-image case, without flips (opt-in for folders:
    ``data.augment.hflip: true``).
    """
    if dataset == "imagefolder":
        return {"random_resized_crop": True, "crop_padding": 0, "hflip": False}
    if dataset in ("cifar10", "cifar100"):
        return {"random_resized_crop": False, "crop_padding": 4, "hflip": True}
    if dataset == "fashion_mnist":
        return {"random_resized_crop": False, "crop_padding": 2, "hflip": True}
    return {"random_resized_crop": False, "crop_padding": 2, "hflip": False}  # mnist, synthetic


def random_resized_crop_boxes(
    u: Tensor, height: int | Tensor, width: int | Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> Tensor:
    """torchvision's RandomResizedCrop parameters, vectorised: ``(B, 4)`` int64 boxes ``(top, left, h, w)``.

    ``u`` holds ``4 * 10`` uniforms per sample (10 attempts, as torchvision);
    ``height``/``width`` may be per-sample tensors (image folders). When no
    attempt fits, falls back to the centre crop with the ratio clamped.
    """
    b = u.shape[0]
    H = torch.as_tensor(height, dtype=torch.float64).expand(b)[:, None]
    W = torch.as_tensor(width, dtype=torch.float64).expand(b)[:, None]
    a = u[:, : 4 * _RRC_ATTEMPTS].view(b, _RRC_ATTEMPTS, 4)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * a[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * a[..., 1]
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    top = torch.floor(a[..., 2] * (H - h + 1))
    left = torch.floor(a[..., 3] * (W - w + 1))
    first = ok.to(torch.int64).argmax(dim=1, keepdim=True)  # first fitting attempt
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    h, w, top, left = pick(h), pick(w), pick(top), pick(left)
    # fallback: whole image, ratio clamped into range, centred
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    any_ok = ok.any(dim=1)
    h, w = torch.where(any_ok, h, fh), torch.where(any_ok, w, fw)
    top = torch.where(any_ok, top, torch.floor((H - fh) / 2))
    left = torch.where(any_ok, left, torch.floor((W - fw) / 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


# ---------------------------------------------------------------------------------------------------- RandAugment
RANDAUGMENT_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "brightness",
    "contrast",
    "sharpness",
    "color",
    "posterize",
    "solarize",
)
_GRAY = (0.299, 0.587, 0.114)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 3:
        w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def _affine(x: Tensor, a: Tensor) -> Tensor:
    """Warp by per-sample 2x2 pixel-space matrices ``a`` (B, 2, 3: last column = shift in image fractions)."""
    _, _, h, w = x.shape
    theta = a.clone()
    theta[:, 0, 1] *= h / w  # pixel-space linear map -> normalised coordinates of a non-square image
    theta[:, 1, 0] *= w / h
    theta[:, :, 2] *= 2  # fractions of the image -> normalised units ([-1, 1] spans the image)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _equalize(x: Tensor) -> Tensor:
    """Per-channel histogram equalisation, PIL's algorithm, vectorised over the batch."""
    b, c, h, w = x.shape
    q = (x * 255).round().to(torch.int64).view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.int64).scatter_add_(1, q, torch.ones_like(q))
    last = 255 - (hist > 0).flip(1).to(torch.int64).argmax(dim=1, keepdim=True)  # highest occupied bin
    step = (h * w - hist.gather(1, last)) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp_min(1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.view(b, c, h, w).to(x.dtype) / 255


def apply_randaugment_op(op: str, x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Apply ``op`` to float images in [0, 1]; ``level`` in [0, 1] (per sample) is the magnitude, ``sign`` +-1.

    Magnitude ranges follow timm's RandAugment at ``level = m / 10``: rotate
    up to 30 degrees, shear 0.3, translate 45 %, enhance factors 1 +- 0.9,
    posterize down to 4 bits, solarize threshold down to 0.
    """
    b = x.shape[0]
    if op == "identity":
        return x
    if op == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)
    if op == "equalize":
        return _equalize(x)
    if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        a = torch.zeros(b, 2, 3, dtype=torch.float64)
        a[:, 0, 0] = a[:, 1, 1] = 1
        s = sign * level
        if op == "rotate":
            t = torch.deg2rad(30 * s)
            a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = t.cos(), -t.sin(), t.sin(), t.cos()
        elif op == "shear_x":
            a[:, 0, 1] = 0.3 * s
        elif op == "shear_y":
            a[:, 1, 0] = 0.3 * s
        elif op == "translate_x":
            a[:, 0, 2] = 0.45 * s
        else:
            a[:, 1, 2] = 0.45 * s
        return _affine(x, a)
    if op in ("brightness", "contrast", "sharpness", "color"):
        factor = (1 + 0.9 * sign * level).clamp_min(0).to(x.dtype)
        if op == "brightness":
            return _blend(torch.zeros_like(x), x, factor)
        if op == "contrast":
            return _blend(_gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, factor)
        if op == "color":
            return _blend(_gray(x).expand_as(x), x, factor) if x.shape[1] == 3 else x
        c = x.shape[1]
        k = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
        blurred = F.conv2d(x, k.expand(c, 1, 3, 3), padding=1, groups=c)
        blurred[:, :, [0, -1], :] = x[:, :, [0, -1], :]  # PIL leaves the border unfiltered
        blurred[:, :, :, [0, -1]] = x[:, :, :, [0, -1]]
        return _blend(blurred, x, factor)
    if op == "posterize":
        bits = (8 - torch.round(4 * level)).clamp(1, 8).to(torch.int64)
        mask = (256 - (1 << (8 - bits))).view(-1, 1, 1, 1)
        return ((x * 255).round().to(torch.int64) & mask).to(x.dtype) / 255
    if op == "solarize":
        threshold = (1 - level).clamp(0, 1).to(x.dtype).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 1 - x, x)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(RANDAUGMENT_OPS)}")


# ---------------------------------------------------------------------------------------------------- pipeline
def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


class BatchTransform:
    """Everything between stored images and the network input, for one split.

    Call with a uint8 ``(B, C, H, W)`` batch (in-memory datasets) or a list of
    PIL images (image folders), the samples' dataset indices, and the
    ``(seed, epoch, view)`` that, with the index, determine every random choice.
    Returns normalised float32 ``(B, C, S, S)``.

    Train: crop (random resized, or random with zero padding) -> flip ->
    RandAugment -> normalise -> random erasing (erased pixels become 0, the
    dataset mean). Images of a folder are first brought to ``image_size``
    (shorter side, centre crop; nothing when they already have it) for the
    padding crop, which then runs on the batch exactly as for in-memory
    images. Eval: in-memory images are resized only if ``image_size`` differs
    from their size; image folders resize the shorter side to ``image_size /
    eval_crop_fraction`` and take the centre crop (0.875: the ImageNet eval;
    1.0: the whole image, untouched when it already has the size).
    """

    def __init__(
        self,
        *,
        train: bool,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentSpec | None = None,
        eval_crop_fraction: float = EVAL_CROP_FRACTION,
    ) -> None:
        if not 0 < eval_crop_fraction <= 1:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction}")
        self.train = train
        self.image_size = int(image_size)
        self.eval_crop_fraction = float(eval_crop_fraction)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment or AugmentSpec()
        if train:
            ops = list(RANDAUGMENT_OPS)
            self.ops = ops
            self.num_uniforms = _SLOT_RANDAUG + 2 * self.augment.randaugment_n

    def __call__(self, batch: Tensor | list[Image.Image], indices: Tensor, seed: int, epoch: int, view: int) -> Tensor:
        if not self.train:
            if isinstance(batch, Tensor):
                x = _resize(batch.float() / 255, self.image_size)
            else:
                x = torch.stack([self._eval_pil(im) for im in batch]).float() / 255
            return (x - self.mean) / self.std
        u = sample_uniforms(seed, epoch, indices, view, self.num_uniforms)
        if isinstance(batch, Tensor):
            x = self._crop_tensor(batch, u)
        elif self.augment.random_resized_crop:
            x = torch.stack([self._random_resized_crop_pil(im, u[i]) for i, im in enumerate(batch)]).float() / 255
        else:  # same size first, then the batch path: the same crops as for in-memory images
            x = self._crop_tensor(torch.stack([self._centre_crop_pil(im, 1.0) for im in batch]), u)
        return self._photometric(x, u)

    # -- geometry
    def _eval_pil(self, image: Image.Image) -> Tensor:
        return self._centre_crop_pil(image, self.eval_crop_fraction)

    def _centre_crop_pil(self, image: Image.Image, fraction: float) -> Tensor:
        """Shorter side to ``image_size / fraction``, then the centre ``image_size`` square (uint8 CHW)."""
        s = self.image_size
        image = _resize_shorter(image, int(s / fraction))
        w, h = image.size
        if (w, h) != (s, s):
            top, left = (h - s) // 2, (w - s) // 2
            image = image.crop((left, top, left + s, top + s))
        return pil_to_tensor(image)

    def _random_resized_crop_pil(self, image: Image.Image, u: Tensor) -> Tensor:
        s, aug = self.image_size, self.augment
        w, h = image.size
        top, left, ch, cw = random_resized_crop_boxes(u[None], h, w, aug.scale, aug.ratio)[0].tolist()
        return pil_to_tensor(image.resize((s, s), Image.BILINEAR, box=(left, top, left + cw, top + ch)))

    def _crop_tensor(self, batch: Tensor, u: Tensor) -> Tensor:
        aug, s = self.augment, self.image_size
        b, c, h, w = batch.shape
        if aug.random_resized_crop:
            box = random_resized_crop_boxes(u, h, w, aug.scale, aug.ratio).to(torch.float64)
            top, left, ch, cw = box.unbind(1)
            theta = torch.zeros(b, 2, 3, dtype=torch.float64)
            theta[:, 0, 0] = cw / w
            theta[:, 1, 1] = ch / h
            theta[:, 0, 2] = (2 * left + cw) / w - 1  # crop centre in normalised coordinates
            theta[:, 1, 2] = (2 * top + ch) / h - 1
            grid = F.affine_grid(theta.float(), [b, c, s, s], align_corners=False)
            return F.grid_sample(batch.float() / 255, grid, mode="bilinear", align_corners=False).clamp(0, 1)
        pad = aug.crop_padding
        if pad > 0:
            # random crop of the zero-padded image, as one flat gather (5x faster than 4-d advanced indexing)
            dy = torch.floor(u[:, _SLOT_CROP] * (2 * pad + 1)).to(torch.int64)  # offset into the padded image
            dx = torch.floor(u[:, _SLOT_CROP + 1] * (2 * pad + 1)).to(torch.int64)
            hp, wp = h + 2 * pad, w + 2 * pad
            padded = F.pad(batch, (pad, pad, pad, pad)).view(b, c, hp * wp)
            rows = torch.arange(h)[None, :] + dy[:, None]  # (B, H)
            cols = torch.arange(w)[None, :] + dx[:, None]  # (B, W)
            flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
            batch = torch.gather(padded, 2, flat).view(b, c, h, w)
        return _resize(batch.float() / 255, s)

    # -- colour and the rest
    def _photometric(self, x: Tensor, u: Tensor) -> Tensor:
        aug = self.augment
        b = x.shape[0]
        if aug.hflip:
            flip = (u[:, _SLOT_FLIP] < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if aug.randaugment_n > 0:
            level = torch.full((b,), min(aug.randaugment_m / 10.0, 3.0), dtype=torch.float64)
            for step in range(aug.randaugment_n):
                which = torch.floor(u[:, _SLOT_RANDAUG + 2 * step] * len(self.ops)).to(torch.int64)
                sign = torch.where(u[:, _SLOT_RANDAUG + 2 * step + 1] < 0.5, -1.0, 1.0).to(torch.float64)
                for k in torch.unique(which).tolist():
                    sel = (which == k).nonzero()[:, 0]
                    x[sel] = apply_randaugment_op(self.ops[k], x[sel], level[sel], sign[sel])
        x = (x - self.mean) / self.std
        if aug.random_erasing > 0:
            x = _random_erase(x, u[:, _SLOT_ERASE : _SLOT_ERASE + 5], aug.random_erasing)
        return x.contiguous()


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        nw, nh = size, max(size, round(h * size / w))
    else:
        nw, nh = max(size, round(w * size / h)), size
    return image.resize((nw, nh), Image.BILINEAR)


def _random_erase(x: Tensor, u: Tensor, p: float) -> Tensor:
    """timm-style random erasing of one rectangle (2-33 % of the area, aspect 0.3-3.3) with probability ``p``."""
    b, _, h, w = x.shape
    apply = u[:, 0] < p
    area = h * w * (0.02 + (1 / 3 - 0.02) * u[:, 1])
    r = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[:, 2])
    eh = torch.round(torch.sqrt(area * r)).clamp(1, h)
    ew = torch.round(torch.sqrt(area / r)).clamp(1, w)
    top = torch.floor(u[:, 3] * (h - eh + 1))
    left = torch.floor(u[:, 4] * (w - ew + 1))
    ys = torch.arange(h, dtype=torch.float64)[None, :]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    in_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]).unsqueeze(1)
    return x.masked_fill(mask, 0.0)
