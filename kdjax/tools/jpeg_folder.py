"""A tiny ImageFolder tree of generated JPEGs, for the streaming pipeline's CPU runs (configs/imagenet.py:mock):
DIR/train/cK/*.jpg and DIR/val/cK/*.jpg, each class a different mean colour plus noise, so a small network learns it.

  python -m kdjax.tools.jpeg_folder DIR [--classes 3] [--train 8] [--val 4] [--side 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from kdjax.errors import ConfigError


def write(root: str, classes: int = 3, train: int = 8, val: int = 4, side: int = 40, seed: int = 0) -> str:
  for name, value, least in (('classes', classes, 2), ('train', train, 1), ('val', val, 1), ('side', side, 1)):
    if value < least:
      raise ConfigError(f'--{name} must be >= {least}, got {value}')
  if os.path.exists(root) and not os.path.isdir(root):
    raise ConfigError(f'{root} exists and is not a directory')
  from PIL import Image
  rng = np.random.default_rng(seed)
  colours = rng.integers(40, 216, (classes, 3))
  for split, n in (('train', train), ('val', val)):
    for k in range(classes):
      folder = os.path.join(root, split, f'c{k}')
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        noise = rng.normal(0.0, 30.0, (side, side, 3))
        img = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f'{i:03d}.jpg'), quality=90)
  return root


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('root')
  p.add_argument('--classes', type=int, default=3)
  p.add_argument('--train', type=int, default=8, help='images per class in train/')
  p.add_argument('--val', type=int, default=4, help='images per class in val/')
  p.add_argument('--side', type=int, default=40)
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  try:
    write(a.root, a.classes, a.train, a.val, a.side, a.seed)
  except (ConfigError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{a.root}: {a.classes} classes, {a.train} train and {a.val} val JPEGs each, {a.side}x{a.side}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
