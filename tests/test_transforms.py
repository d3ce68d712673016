"""kdjax.data.transforms against independent computations: torchvision's crop rules worked by hand, the fallback
probability of RandomResizedCrop integrated numerically, PIL's bilinear filter re-implemented in NumPy, and PIL's
own decode + convert('RGB') (what torchvision's ImageFolder loader is)."""

import io
import math

import numpy as np
from PIL import Image, ImageFile
import pytest

from kdjax.data import transforms

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
  img = Image.fromarray(arr)
  if mode:
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth uint8 RGB image (JPEG keeps it within a few levels)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  phases = rng.uniform(0, 2 * np.pi, 3)
  return np.stack([127.5 + 100 * np.sin(3 * x + 2 * y + p) for p in phases], -1).astype(np.uint8)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- random_resized_crop_params


@pytest.mark.parametrize('height,width', [(375, 500), (500, 375), (224, 224), (200, 1000), (31, 17)])
def test_crop_params_within_image_scale_and_ratio(height, width):
  rng = np.random.default_rng(0)
  area = height * width
  for _ in range(2000):
    top, left, h, w = transforms.random_resized_crop_params(rng, height, width)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    if (top, left, h, w) == _fallback(height, width):
      continue
    # w = round(w_f), h = round(h_f) with w_f / h_f in RATIO and w_f * h_f in SCALE * area.
    assert (w - 0.5) / (h + 0.5) <= RATIO[1] and (w + 0.5) / (h - 0.5) >= RATIO[0]
    assert (w - 0.5) * (h - 0.5) <= SCALE[1] * area and (w + 0.5) * (h + 0.5) >= SCALE[0] * area


def _fallback(height, width):
  """torchvision's fallback crop, worked by hand: the whole image clamped to the ratio range, centred (floor)."""
  if width / height < RATIO[0]:
    w, h = width, int(round(width / RATIO[0]))
  elif width / height > RATIO[1]:
    w, h = int(round(height * RATIO[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_crop_params_fallback_by_hand():
  rng = np.random.default_rng(0)
  # No try can fit a crop of at least 0.08 of the area with a ratio in [3/4, 4/3] into 10 px: always the fallback.
  # Wide: h = 10, w = round(10 * 4/3) = 13, left = (1000 - 13) // 2 = 493. Tall: the transpose.
  assert transforms.random_resized_crop_params(rng, 10, 1000) == (0, 493, 10, 13)
  assert transforms.random_resized_crop_params(rng, 1000, 10) == (493, 0, 13, 10)
  # An area scale above 1 never fits either: an image within the ratio range is kept whole; outside, clamped.
  assert transforms.random_resized_crop_params(rng, 300, 350, scale=(2.0, 3.0)) == (0, 0, 300, 350)
  assert transforms.random_resized_crop_params(rng, 300, 500, scale=(2.0, 3.0)) == (0, 50, 300, 400)
  assert transforms.random_resized_crop_params(rng, 501, 300, scale=(2.0, 3.0)) == (50, 0, 400, 300)


def test_crop_params_fallback_frequency_matches_integral():
  """On a 200 x 1000 image a try fits iff its rounded height is <= 200 (its width always fits), i.e. iff
  sqrt(s * A / r) < 200.5 with s ~ U(0.08, 1), log r ~ U(log 3/4, log 4/3); the fallback is taken when all 10 tries
  fail. That probability, integrated numerically here, must match the frequency of the fallback crop."""
  height, width = 200, 1000
  log_r = np.linspace(math.log(RATIO[0]), math.log(RATIO[1]), 200001)
  s_max = 200.5 ** 2 * np.exp(log_r) / (height * width)  # the try fits iff s < s_max(r)
  p_fit = np.mean(np.clip((s_max - SCALE[0]) / (SCALE[1] - SCALE[0]), 0, 1))
  p_fallback = (1 - p_fit) ** 10
  rng = np.random.default_rng(1)
  n = 20000
  hits = sum(transforms.random_resized_crop_params(rng, height, width) == _fallback(height, width) for _ in range(n))
  assert 0.1 < p_fallback < 0.5
  np.testing.assert_allclose(hits / n, p_fallback, atol=4 * math.sqrt(p_fallback * (1 - p_fallback) / n))


def test_crop_params_aspect_log_uniform():
  """Where every try fits at its first draw (a large square image, area scale <= 0.5), log(w / h) is uniform on
  [log 3/4, log 4/3]: mean 0 and variance (log(16/9))^2 / 12."""
  rng = np.random.default_rng(2)
  params = np.array([transforms.random_resized_crop_params(rng, 2000, 2000, scale=(0.08, 0.5)) for _ in range(20000)])
  log_ratio = np.log(params[:, 3] / params[:, 2])
  np.testing.assert_allclose(log_ratio.mean(), 0.0, atol=0.005)
  np.testing.assert_allclose(log_ratio.var(), math.log(16 / 9) ** 2 / 12, rtol=0.03)
  area = params[:, 2] * params[:, 3] / 2000 ** 2
  np.testing.assert_allclose(area.mean(), (0.08 + 0.5) / 2, rtol=0.02)


def test_crop_params_seeded():
  draw = lambda seed: [transforms.random_resized_crop_params(np.random.default_rng(seed), 375, 500) for _ in range(5)]
  assert draw(3) == draw(3)
  rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(4)
  a = [transforms.random_resized_crop_params(rng_a, 375, 500) for _ in range(5)]
  b = [transforms.random_resized_crop_params(rng_b, 375, 500) for _ in range(5)]
  assert a != b


# --- resized_crop: PIL's bilinear filter (antialiased), re-implemented in NumPy


def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PIL's bilinear resampling (libImaging/Resample.c, precompute_coeffs): the triangle filter
  widened by the downscale factor, centred on (i + 0.5) * scale, taps clipped to the image and renormalised."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = filterscale
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
    x = np.arange(lo, hi)
    w = np.maximum(0.0, 1.0 - np.abs((x - center + 0.5) / filterscale))
    weights[i, lo:hi] = w / w.sum()
  return weights


@pytest.mark.parametrize('crop,size', [((10, 20, 120, 90), 32), ((0, 0, 17, 23), 40), ((5, 7, 64, 64), 32)])
def test_resized_crop_matches_numpy_bilinear(crop, size):
  img = _noise(140, 130)
  top, left, h, w = crop
  patch = img[top:top + h, left:left + w].astype(np.float64)
  expected = np.einsum('oh,hwc,pw->opc', _pil_bilinear_weights(h, size), patch, _pil_bilinear_weights(w, size))
  out = transforms.resized_crop(img, top, left, h, w, size)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  # PIL filters in two passes (horizontal, then vertical) in fixed point, rounding to uint8 after each.
  np.testing.assert_allclose(out.astype(np.float64), expected, atol=1.0)


def test_resized_crop_of_output_size_is_the_crop():
  img = _noise(50, 60)
  np.testing.assert_array_equal(transforms.resized_crop(img, 3, 4, 32, 32, 32), img[3:35, 4:36])


def test_random_resized_crop_flip_composition():
  img = _noise(48, 64)
  flips = 0
  for seed in range(40):
    out = transforms.random_resized_crop_flip(img, np.random.default_rng(seed), 24)
    rng = np.random.default_rng(seed)
    top, left, h, w = transforms.random_resized_crop_params(rng, 48, 64)
    expected = transforms.resized_crop(img, top, left, h, w, 24)
    flip = rng.random() < 0.5
    flips += flip
    np.testing.assert_array_equal(out, expected[:, ::-1] if flip else expected)
  assert 5 < flips < 35


# --- resize_center_crop


@pytest.mark.parametrize('height,width', [(375, 500), (500, 375), (333, 500), (257, 301), (301, 257), (256, 256)])
def test_resize_center_crop_matches_pil_by_hand(height, width):
  img = _noise(height, width, seed=height)
  short, long = min(height, width), max(height, width)
  new_short, new_long = 256, int(256 * long / short)  # torchvision: the longer side truncated
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  resized = Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR)
  top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
  expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
  np.testing.assert_array_equal(transforms.resize_center_crop(img, 224, 256), expected)


def test_center_crop_rounds_offsets_half_to_even():
  # Already 256 on the shorter side: no resize, so the crop is a slice. (257 - 224) / 2 = 16.5 -> 16 and
  # (259 - 224) / 2 = 17.5 -> 18 (Python's round, as torchvision's F.center_crop).
  img = _noise(256, 257)
  np.testing.assert_array_equal(transforms.resize_center_crop(img, 224, 256), img[16:240, 16:240])
  img = _noise(259, 256)
  np.testing.assert_array_equal(transforms.resize_center_crop(img, 224, 256), img[18:242, 16:240])


def test_center_crop_larger_than_image_pads_with_zeros():
  # Resize(200) leaves a 200 x 266 image as it is; CenterCrop(224) pads 12 rows above and below (torchvision's
  # padding_ltrb), then crops columns from round((266 - 224) / 2) = 21.
  img = _noise(200, 266)
  expected = np.zeros((224, 224, 3), np.uint8)
  expected[12:212] = img[:, 21:245]
  np.testing.assert_array_equal(transforms.resize_center_crop(img, 224, 200), expected)


# --- decode


def test_decode_rgb_jpeg_and_png():
  src = _smooth(60, 80)
  out = transforms.decode(_encode(src, 'JPEG', quality=95))
  assert out.shape == (60, 80, 3) and out.dtype == np.uint8 and out.flags.writeable
  assert np.abs(out.astype(int) - src).mean() < 2
  # A PNG is read as a PNG whatever its file is called (ImageNet has one named .JPEG): decode sees only bytes.
  np.testing.assert_array_equal(transforms.decode(_encode(src, 'PNG')), src)  # lossless


def test_decode_converts_as_the_imagefolder_loader():
  src = _noise(30, 40)
  gray = np.asarray(Image.fromarray(src).convert('L'))
  np.testing.assert_array_equal(transforms.decode(_encode(gray, 'PNG')), np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([src, np.full((30, 40, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(transforms.decode(_encode(rgba, 'PNG')), src)  # alpha dropped, not composited
  palette = Image.fromarray(src).quantize(16)
  buf = io.BytesIO()
  palette.save(buf, 'PNG', transparency=3)
  lut = np.array(palette.getpalette()[:48], np.uint8).reshape(16, 3)
  np.testing.assert_array_equal(transforms.decode(buf.getvalue()), lut[np.asarray(palette)])
  # Grayscale and CMYK JPEGs: what PIL's open + convert('RGB') gives (torchvision's pil_loader).
  for mode in ('L', 'CMYK'):
    data = _encode(_smooth(30, 40), 'JPEG', mode=mode, quality=90)
    with Image.open(io.BytesIO(data)) as img:
      assert img.mode == mode
      expected = np.asarray(img.convert('RGB'))
    np.testing.assert_array_equal(transforms.decode(data), expected)


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_truncated_raises(fmt):
  data = _encode(_noise(64, 64), fmt)
  with pytest.raises(transforms.CorruptImage, match='truncated|broken|decode'):
    transforms.decode(data[:len(data) // 2])


@pytest.mark.parametrize('data', [b'', b'not an image at all', bytes(range(256)) * 4])
def test_decode_garbage_raises(data):
  with pytest.raises(transforms.CorruptImage, match='not an image PIL can identify'):
    transforms.decode(data)


def test_decode_bomb_raises(monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # PIL refuses more than twice this many pixels
  with pytest.raises(transforms.CorruptImage, match='decompression bomb'):
    transforms.decode(_encode(_smooth(20, 20), 'PNG'))


def test_decode_refuses_when_pil_accepts_truncated_files(monkeypatch):
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
  data = _encode(_noise(64, 64), 'JPEG')
  with pytest.raises(RuntimeError, match='LOAD_TRUNCATED_IMAGES'):
    transforms.decode(data[:len(data) // 2])


def test_decode_min_side_scales_by_powers_of_two_never_below():
  data = _encode(_smooth(700, 1000), 'JPEG', quality=90)
  # The largest s in (8, 4, 2, 1) with s <= min(1000 // m, 700 // m); output ceil(700 / s) x ceil(1000 / s).
  for min_side, (h, w) in [(300, (350, 500)), (100, (175, 250)), (80, (88, 125)), (351, (700, 1000)),
                           (350, (350, 500)), (1, (88, 125)), (5000, (700, 1000))]:
    assert transforms.decode(data, min_side).shape == (h, w, 3), min_side
  for min_side in range(60, 720, 7):
    assert min(transforms.decode(data, min_side).shape[:2]) >= min(min_side, 700)
  np.testing.assert_array_equal(transforms.decode(data, None), np.asarray(Image.open(io.BytesIO(data))))
  small = transforms.decode(data, 300).astype(int)  # the same picture at half size, up to DCT-scaling differences
  full_half = np.asarray(Image.fromarray(transforms.decode(data)).resize((500, 350), Image.BILINEAR)).astype(int)
  assert np.abs(small - full_half).mean() < 3
  png = _encode(_smooth(70, 100), 'PNG')
  assert transforms.decode(png, 20).shape == (70, 100, 3)  # draft is JPEG only


def test_train_and_eval_transforms_compose():
  data = _encode(_smooth(90, 120), 'JPEG', quality=90)
  img = transforms.decode(data)
  np.testing.assert_array_equal(transforms.eval_transform(data, 32, 40), transforms.resize_center_crop(img, 32, 40))
  np.testing.assert_array_equal(transforms.train_transform(data, np.random.default_rng(5), 32),
                                transforms.random_resized_crop_flip(img, np.random.default_rng(5), 32))
  draft = _encode(_smooth(400, 600), 'JPEG', quality=90)
  np.testing.assert_array_equal(transforms.eval_transform(draft, 32, 40, min_side=40),
                                transforms.resize_center_crop(transforms.decode(draft, 40), 32, 40))
