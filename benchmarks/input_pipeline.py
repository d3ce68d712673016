r"""Host-side ImageNet input speed: images/s per CPU core for decode, decode + train transform and decode + eval
transform (`kdjax/data/transforms.py`), with PIL's full decode and with its JPEG draft (reduced-DCT) decode, and
simplejpeg's decoder beside PIL's where it is installed; then the host cores a GPU's ResNet18 step rate needs.

The images are generated (no ImageNet needed): N JPEGs (quality 90) of random sizes around ImageNet's typical
500x375 (width 400-600, height 0.6-0.9 of it, one in five portrait), each a smooth two-colour gradient with a dozen
random filled ellipses and rectangles, softened by a Gaussian blur, plus texture (Gaussian noise of sigma 40 drawn at
half resolution and upsampled bicubically) and pixel noise of sigma 6. That makes files of about 110 kB, ImageNet's
average (its 138 GB training tar over 1,281,167 images): decode time follows the entropy-coded bytes, so smoother
images (25 kB with the shapes alone) decode faster than photos and pure-noise ones slower. `--large` makes them
about 2x that size (ImageNet holds many photos of 1000+ px, where the draft decode pays off).

Everything runs in this one process, pinned to one core (`os.sched_setaffinity`); rates are images per second of
this process's CPU time (`time.process_time`), which a loaded, shared machine distorts less than wall time (wall
rates are printed beside them). Each row is the median of `--repeats` passes over all N images.

`--grain` then streams the same files through a plain Grain pipeline (`MapDataset` -> `random_map` of
`train_transform` -> `to_iter_dataset` with 1 or 16 read threads and a prefetch buffer of 128 images -> `batch(64)`
-> `mp_prefetch` with 0, 1 or 2 worker processes), not pinned, over N x 16 images (far more than the buffers hold
ahead), and prints images per CPU second of the whole pipeline (main process and workers), the wall images/s after
the first batch and the time to that batch (the workers' start): Grain's own cost per image and how it scales on
this machine. It is Grain alone, not kdjax's streaming loader.

  python benchmarks/input_pipeline.py [--n=200] [--repeats=3] [--large] [--step_rate=6000] [--grain]
"""

import argparse
import functools
import gc
import io
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kdjax.data import transforms  # noqa: E402

# ResNet18 training throughput of one A100 that the cores figure is computed for (images/s; --step_rate changes it).
# FFCV's published ResNet-18 runs on 1 x A100 (github.com/libffcv/ffcv-imagenet, README table: 88 epochs of
# 1,281,167 images in 187.3 min = 10,030 img/s, and 16 epochs in 35.0 min = 9,760 img/s) train at 160-192 px; at
# 224 px that scales to about 10,000 * (176 / 224)^2 = 6,200 img/s. NVIDIA's ResNet-50 v1.5 on 1 x A100 80GB, AMP,
# 224 px: 2,470 img/s (github.com/NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5),
# times ResNet-50 / ResNet-18 FLOPs (4.1 / 1.8 G) = 5,600 img/s. 6,000 is between the two.
A100_RESNET18_IMG_S = 6000


def make_images(n: int, seed: int, large: bool) -> list[bytes]:
  """N photo-like JPEG files (quality 90) as bytes: gradients, shapes, blur and a little noise (see the docstring)."""
  from PIL import Image, ImageDraw, ImageFilter
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    w = int(rng.integers(400, 601) * (2 if large else 1))
    h = int(w * rng.uniform(0.6, 0.9))
    if rng.random() < 0.2:
      w, h = h, w
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.linspace(0, 1, w)[None, :, None] + np.linspace(0, 1, h)[:, None, None]) / 2
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
      x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
      x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
      shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
      shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    coarse = rng.normal(0, 40, (h // 2 + 1, w // 2 + 1, 3)).astype(np.float32)
    texture = np.stack([np.asarray(Image.fromarray(coarse[..., c], 'F').resize((w, h), Image.BICUBIC))
                        for c in range(3)], -1)
    pixels = np.asarray(img, np.float32) + texture + rng.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def simplejpeg_contenders():
  """simplejpeg's libjpeg-turbo decode (full, and its own reduced-scale decode) with the same PIL transforms."""
  try:
    import simplejpeg
  except ImportError:
    return {}
  from PIL import Image

  def decode(data, min_side=None):
    if min_side is None:
      return simplejpeg.decode_jpeg(data, colorspace='RGB')
    return simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=min_side, min_width=min_side)

  def train(data, rng, min_side=None):
    return transforms._random_resized_crop_flip(Image.fromarray(decode(data, min_side)), rng, 224)

  def evaluate(data, min_side=None):
    return transforms._resize_center_crop(Image.fromarray(decode(data, min_side)), 224, 256)

  return {
      'simplejpeg decode': lambda d, rng: decode(d),
      'simplejpeg decode, min 256': lambda d, rng: decode(d, 256),
      'simplejpeg decode + train': lambda d, rng: train(d, rng),
      'simplejpeg decode + eval': lambda d, rng: evaluate(d),
  }


def contenders():
  t = transforms
  rows = {
      'PIL decode': lambda d, rng: t.decode(d),
      'PIL decode, draft min 224': lambda d, rng: t.decode(d, 224),
      'PIL decode, draft min 256': lambda d, rng: t.decode(d, 256),
      'PIL decode + train (RRC 224 + flip)': lambda d, rng: t.train_transform(d, rng, 224),
      'PIL draft 224 + train (RRC 224 + flip)': lambda d, rng: t.train_transform(d, rng, 224, min_side=224),
      'PIL decode + eval (resize 256, crop 224)': lambda d, rng: t.eval_transform(d, 224, 256),
      'PIL draft 256 + eval (resize 256, crop 224)': lambda d, rng: t.eval_transform(d, 224, 256, min_side=256),
  }
  rows.update(simplejpeg_contenders())
  return rows


def measure(fn, files: list[bytes], repeats: int) -> tuple[float, float]:
  """(images per CPU second, images per wall second), medians over `repeats` passes."""
  cpu, wall = [], []
  fn(files[0], np.random.default_rng(0))  # warm-up (imports, first allocation)
  for r in range(repeats):
    rng = np.random.default_rng(r)
    c0, w0 = time.process_time(), time.perf_counter()
    for data in files:
      fn(data, rng)
    cpu.append(len(files) / (time.process_time() - c0))
    wall.append(len(files) / (time.perf_counter() - w0))
  return statistics.median(cpu), statistics.median(wall)


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def grain_rate(files: list[bytes], workers: int, threads: int, batch: int, epochs: int) -> tuple[float, float, float]:
  """(seconds to the first batch, wall images/s after it, images per CPU second of the whole run) of a Grain pipeline
  decoding and augmenting `files` `epochs` times: `threads` read threads (Grain's ReadOptions; PIL releases the GIL
  while it decodes and resizes) in each of `workers` processes (0: in this process). The CPU time is this process's
  (all its threads) plus its finished children's (the workers, reaped when the iterator is closed)."""
  from absl import flags
  import grain
  if not flags.FLAGS.is_parsed():  # Grain reads absl flags; this script parses its own arguments
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.source(files).repeat(epochs)
  ds = ds.random_map(functools.partial(transforms.train_transform, size=224), seed=0)
  # Batched after to_iter_dataset: the read threads and the prefetch buffer then count images, not batches (batching
  # the MapDataset first gives each thread a whole batch, and the first batch waits for `threads` batches).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch)).batch(batch)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  cpu0, children0 = time.process_time(), _children_cpu()
  t0 = time.perf_counter()
  it = iter(it)
  first = next(it)
  t1, n = time.perf_counter(), 0
  for b in it:
    n += len(b)
  t2 = time.perf_counter()
  assert first.shape == (batch, 224, 224, 3) and n + batch == len(files) * epochs, (first.shape, n)
  del it
  gc.collect()
  deadline = time.perf_counter() + 30
  while multiprocessing.active_children() and time.perf_counter() < deadline:  # reap the workers
    time.sleep(0.1)
  cpu = time.process_time() - cpu0 + _children_cpu() - children0
  return t1 - t0, n / (t2 - t1), (n + batch) / cpu


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _load() -> str:
  return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--n', type=int, default=200)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--large', action='store_true', help='images about 1000x750 instead of 500x375')
  p.add_argument('--step_rate', type=float, default=A100_RESNET18_IMG_S,
                 help='training images/s of the accelerator to feed (default: an A100 on ResNet18, see source)')
  p.add_argument('--core', type=int, default=None, help='the CPU to pin to (default: the first allowed)')
  p.add_argument('--grain', action='store_true', help='also stream the files through Grain (see the docstring)')
  p.add_argument('--grain_epochs', type=int, default=16)
  args = p.parse_args()

  allowed = os.sched_getaffinity(0)
  core = args.core if args.core is not None else min(allowed)
  os.sched_setaffinity(0, {core})
  files = make_images(args.n, args.seed, args.large)
  # The bytes are also written to a temp dir and read back, as a pipeline reads them (from the page cache here).
  with tempfile.TemporaryDirectory() as tmp:
    for i, data in enumerate(files):
      with open(os.path.join(tmp, f'{i:05d}.jpg'), 'wb') as f:
        f.write(data)
    files = [_read(os.path.join(tmp, f'{i:05d}.jpg')) for i in range(len(files))]
  sizes = np.array([transforms.decode(d).shape[:2] for d in files])
  print(f'{len(files)} JPEGs, quality 90, {sizes[:, 1].mean():.0f} x {sizes[:, 0].mean():.0f} px on average '
        f'(short side {sizes.min(1).min()}-{sizes.min(1).max()}), {np.mean([len(d) for d in files]) / 1e3:.0f} kB '
        f'on average; pinned to CPU {core}; load average {_load()}')
  cores_for = f'cores for {args.step_rate:.0f} img/s'
  print(f'{"contender":48s} {"img/s per core (CPU time)":>26s} {"img/s (wall)":>13s} {cores_for:>20s}')
  for name, fn in contenders().items():
    cpu_rate, wall_rate = measure(fn, files, args.repeats)
    print(f'{name:48s} {cpu_rate:26.0f} {wall_rate:13.0f} {args.step_rate / cpu_rate:20.1f}')
  if args.grain:
    os.sched_setaffinity(0, allowed)
    print(f'Grain, train transform, batch 64, {args.grain_epochs} passes, not pinned ({len(allowed)} CPUs allowed):')
    for workers, threads in [(0, 1), (0, 16), (1, 16), (2, 16)]:
      start, rate, cpu_rate = grain_rate(files, workers, threads, 64, args.grain_epochs)
      name = f'Grain, {workers} worker processes x {threads} read threads'
      print(f'{name:48s} {cpu_rate:26.0f} {rate:13.0f} {args.step_rate / cpu_rate:20.1f}  first batch after '
            f'{start:.1f} s, load average {_load()}')
  print(f'load average at the end: {_load()}')


if __name__ == '__main__':
  main()
