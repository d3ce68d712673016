"""ImageNet decode and augmentation on the host, one image at a time, as torchvision does them on PIL images.

- `decode`: bytes -> uint8 [H, W, 3] RGB, as torchvision's `ImageFolder` loader (`datasets/folder.py`,
  `pil_loader`: `Image.open(f).convert('RGB')`): grayscale, CMYK, palette and alpha images are converted by PIL's
  `convert('RGB')` (alpha is dropped, not composited), any format PIL identifies is read whatever the file is named
  (ImageNet's one PNG named .JPEG included), and EXIF orientation is not applied (torchvision does not either).
- `random_resized_crop_params`, `resized_crop`, `random_resized_crop_flip`: `transforms.RandomResizedCrop(224)` +
  `RandomHorizontalFlip()`, the training transform of torchvision's ImageNet references
  (`references/classification/presets.py`, `ClassificationPresetTrain`).
- `resize_center_crop`: `Resize(256)` + `CenterCrop(224)`, their evaluation transform (`ClassificationPresetEval`).

Resizing is PIL's bilinear filter, which torchvision calls for PIL images (`transforms/_functional_pil.py`,
`resize`): PIL's resampling always antialiases (its support widens with the downscale factor). Random draws come
from a NumPy Generator instead of torch's global generator: the same distributions, not the same numbers for a seed.
Normalisation is left to the device (the pipeline ships uint8).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError


class CorruptImage(ValueError):
  """The bytes are not a readable image; the message says what is wrong (the caller adds the path)."""


def _reason(e: Exception) -> str:
  return ' '.join(str(e).split())


def _open(data: bytes, min_side: int | None) -> Image.Image:
  """`decode` as a PIL image in RGB mode (the transforms below resize it without a round trip through NumPy)."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # With this process-wide PIL flag set a truncated file loads without error, its missing rows grey. Not a
    # CorruptImage (nor a ValueError/OSError): a pipeline that skips corrupt files must not skip every file for it.
    raise RuntimeError('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: truncated images would load '
                       'silently; unset it')
  if min_side is not None and min_side < 1:
    raise ValueError(f'min_side must be >= 1 or None, got {min_side}')
  try:
    img = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    raise CorruptImage(f'not an image PIL can identify ({len(data)} bytes, starting {data[:8]!r})') from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    # More than 2 x Image.MAX_IMAGE_PIXELS (checked when opened), or more than MAX_IMAGE_PIXELS where warnings are
    # errors: a bomb that would take the host's memory.
    raise CorruptImage(_reason(e)) from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise CorruptImage(f'unreadable image header: {_reason(e)}') from None
  try:
    if min_side is not None:
      # JPEG only (a no-op for other formats): libjpeg decodes at 1/2, 1/4 or 1/8 scale, the largest factor whose
      # output keeps both sides >= min_side (PIL's JpegImagePlugin.draft picks s in 8, 4, 2, 1 with
      # s <= min(W // min_side, H // min_side), and the output is ceil(W / s) x ceil(H / s)).
      img.draft('RGB', (min_side, min_side))
    img.load()  # Image.open is lazy: decode now, so that truncated data raises here
    return img if img.mode == 'RGB' else img.convert('RGB')
  except (OSError, ValueError, SyntaxError, EOFError) as e:  # 'image file is truncated', broken data streams
    raise CorruptImage(f'cannot decode {img.format or "image"} data: {_reason(e)}') from None


def open_image(data: bytes) -> Image.Image:
  """The image in `data` as a decoded PIL image in RGB mode (torchvision's loader, as `decode`); CorruptImage if the
  bytes are unreadable, truncated or a decompression bomb. The device path's folder reader decodes with it too."""
  return _open(data, None)


def decode(data: bytes, min_side: int | None = None) -> np.ndarray:
  """The image in `data` (JPEG, PNG, any format PIL reads) as uint8 [H, W, 3] RGB; CorruptImage if unreadable.

  `min_side=None` (the default) is the exact full decode of torchvision's loader. With `min_side`, a JPEG is decoded
  by libjpeg's DCT scaling (PIL's `draft` mode) at 1/2, 1/4 or 1/8 of its size when its shorter side stays
  >= min_side, which is cheaper for large photos (the inverse DCT, colour conversion and the later resize shrink;
  the entropy decoding does not: benchmarks/README.md); the pixels then differ slightly from a full decode
  followed by the same resize (DCT-domain downscaling instead of a bilinear filter), so use it only where that is
  acceptable (e.g. min_side = the evaluation resize, 256, or the training crop size). Images whose shorter side is
  below 2 * min_side are decoded in full either way.
  """
  return np.array(_open(data, min_side))


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop: torchvision's `RandomResizedCrop.get_params` (`transforms/transforms.py`).

  Up to 10 tries of an area fraction ~ U(scale) and an aspect ratio (w / h) log-uniform in `ratio`, sides rounded
  to the nearest integer, accepted when the crop fits; its position uniform over the valid offsets. If no try fits:
  a central crop of the whole image, clamped to the ratio range (width kept and height = round(width / min ratio)
  for images narrower than the range, height kept and width = round(height * max ratio) for wider ones).
  torchvision draws in float32 from torch's generator; this draws in float64 from `rng`.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: Image.Image, width: int, height: int) -> Image.Image:
  # torchvision's F.resize returns the image itself when it already has the output size.
  return img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)


def _resized_crop(img: Image.Image, top: int, left: int, h: int, w: int, size: int) -> Image.Image:
  # torchvision's F.resized_crop on PIL: crop (box beyond the image is zero-filled by PIL), then resize the crop.
  return _resize(img.crop((left, top, left + w, top + h)), size, size)


def resized_crop(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
  """The crop (top, left, h, w) of `img` resized to uint8 [size, size, 3], bilinear: torchvision's
  `F.resized_crop` on a PIL image (`transforms/functional.py`)."""
  return np.array(_resized_crop(Image.fromarray(img), top, left, h, w, size))


def _random_resized_crop_flip(img: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
  top, left, h, w = random_resized_crop_params(rng, img.height, img.width)
  out = np.array(_resized_crop(img, top, left, h, w, size))
  # RandomHorizontalFlip(p=0.5), drawn after the crop as in the references' Compose.
  return out[:, ::-1].copy() if rng.random() < 0.5 else out


def random_resized_crop_flip(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
  """RandomResizedCrop(size) (scale (0.08, 1), ratio (3/4, 4/3), bilinear) + RandomHorizontalFlip(0.5): uint8
  [size, size, 3], torchvision's ImageNet training transform before ToTensor/Normalize."""
  return _random_resized_crop_flip(Image.fromarray(img), rng, size)


def _center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
  # torchvision's F.center_crop: offsets rounded with Python's round (ties to even).
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _resize_center_crop(img: Image.Image, size: int, resize: int) -> np.ndarray:
  width, height = img.size
  # F.resize with one int (torchvision's _compute_resized_output_size): the shorter side becomes `resize`, the longer
  # int(resize * long / short), truncated.
  if width <= height:
    new_w, new_h = resize, int(resize * height / width)
  else:
    new_w, new_h = int(resize * width / height), resize
  img = _resize(img, new_w, new_h)
  if size > new_w or size > new_h:
    # CenterCrop pads with zeros first (left/top get the floor of half the shortfall): the same as cropping a box
    # that reaches past the image, which PIL fills with zeros.
    top = -((size - new_h) // 2) if size > new_h else int(round((new_h - size) / 2.0))
    left = -((size - new_w) // 2) if size > new_w else int(round((new_w - size) / 2.0))
  else:
    top, left = _center_crop_box(new_h, new_w, size)
  return np.array(img.crop((left, top, left + size, top + size)))


def resize_center_crop(img: np.ndarray, size: int = 224, resize: int = 256) -> np.ndarray:
  """Resize(resize) of the shorter side (bilinear) + CenterCrop(size): uint8 [size, size, 3], torchvision's ImageNet
  evaluation transform before ToTensor/Normalize."""
  return _resize_center_crop(Image.fromarray(img), size, resize)


def train_transform(data: bytes, rng: np.random.Generator, size: int = 224, *,
                    min_side: int | None = None) -> np.ndarray:
  """decode + random_resized_crop_flip: the bytes of one training image to uint8 [size, size, 3]."""
  return _random_resized_crop_flip(_open(data, min_side), rng, size)


def eval_transform(data: bytes, size: int = 224, resize: int = 256, *, min_side: int | None = None) -> np.ndarray:
  """decode + resize_center_crop: the bytes of one evaluation image to uint8 [size, size, 3]."""
  return _resize_center_crop(_open(data, min_side), size, resize)
