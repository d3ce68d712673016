"""A dataset read from a folder: `root/images/*` plus `root/annotations.csv` (the layout MHIST ships in).

The CSV names each image and its label; columns are picked by `label_column` / `file_column`, or found
automatically (the file column is the one whose values name files in images/, the label column MHIST's
'Majority Vote Label' or else the next text column). A 'Partition' column with train/test values is honoured;
otherwise the test split is a seeded stratified `test_fraction`. Labels are indexed in sorted order.
"""

from __future__ import annotations

import csv
import os

from absl import logging
import numpy as np

from kdjax.data import Split
from kdjax.errors import ConfigError, DatasetNotFoundError


def _read_csv(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _pick_columns(rows: list[dict], images_dir: str, cfg) -> tuple[str, str]:
  columns = list(rows[0])
  file_col = cfg.get('file_column') or next(
      (c for c in columns if os.path.exists(os.path.join(images_dir, rows[0][c]))), None)
  if file_col is None or file_col not in columns:
    raise ConfigError(f'cannot find the image-file column in {columns}; set data.folder.file_column')
  label_col = cfg.get('label_column') or ('Majority Vote Label' if 'Majority Vote Label' in columns else next(
      (c for c in columns if c not in (file_col, 'Partition')), None))
  if label_col is None or label_col not in columns:
    raise ConfigError(f'cannot find the label column in {columns}; set data.folder.label_column')
  return file_col, label_col


def _load_image(path: str, size: int) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as img:
    img = img.convert('RGB')
    if size:
      img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def load(cfg) -> tuple[Split, Split, int]:
  root = os.path.expanduser(cfg.root or '')
  images_dir, csv_path = os.path.join(root, 'images'), os.path.join(root, 'annotations.csv')
  if not (os.path.isdir(images_dir) and os.path.isfile(csv_path)):
    raise DatasetNotFoundError(f'folder dataset not found: expected {images_dir}/ and {csv_path} '
                               '(set --config.data.folder.root to a directory in that layout, e.g. MHIST)')
  rows = _read_csv(csv_path)
  if not rows:
    raise DatasetNotFoundError(f'{csv_path} lists no images')
  file_col, label_col = _pick_columns(rows, images_dir, cfg)
  classes = sorted({r[label_col] for r in rows})
  images = [_load_image(os.path.join(images_dir, r[file_col]), cfg.get('image_size', 0)) for r in rows]
  if len({im.shape for im in images}) > 1:
    raise ConfigError('the images have different sizes; set data.folder.image_size to resize them')
  images = np.stack(images)
  labels = np.array([classes.index(r[label_col]) for r in rows], np.int32)
  if 'Partition' in rows[0]:
    part = np.array([r['Partition'].strip().lower() for r in rows])
    is_test = part == 'test'
  else:
    from sklearn.model_selection import train_test_split
    _, test_idx = train_test_split(np.arange(len(rows)), test_size=cfg.get('test_fraction', 0.2),
                                   random_state=cfg.get('seed', 0), stratify=labels)
    is_test = np.isin(np.arange(len(rows)), test_idx)
  logging.info('folder dataset %s: classes %s, %d train / %d test images of %s', root,
               dict(enumerate(classes)), int((~is_test).sum()), int(is_test.sum()), images.shape[1:])
  return (Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test]), len(classes))
