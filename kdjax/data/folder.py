"""Datasets read from a folder of images, in one of two layouts (chosen by what the root holds):

- `root/images/*` plus `root/annotations.csv` (the layout MHIST ships in). The CSV names each image and its label;
  columns are picked by `label_column` / `file_column`, or found automatically (the file column is the one whose
  values name files in images/, the label column MHIST's 'Majority Vote Label' or else the next text column). A
  'Partition' column with train/test values is honoured.
- torchvision's ImageFolder: one subfolder of images per class, either under `root/train/` and `root/test/` (or
  `root/val/`) or directly in `root`.

Without a given partition the test split is a seeded stratified `test_fraction`. Labels are indexed in sorted order
of the class names, as torchvision does (those of train/ for both splits). Images are decoded as RGB, as
torchvision's default loader does.
"""

from __future__ import annotations

import csv
import dataclasses
import os

from absl import logging
import numpy as np

from kdjax.data import Split
from kdjax.errors import ConfigError, DatasetNotFoundError

# torchvision's IMG_EXTENSIONS.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
LAYOUTS = ('images/ and annotations.csv (MHIST), or one subfolder of images per class (ImageFolder), optionally '
           'under train/ and test/')


@dataclasses.dataclass
class Listing:
  """What a folder holds, before any image is decoded."""
  paths: list[str]
  labels: np.ndarray  # int32, indices into `classes`
  is_test: np.ndarray  # bool
  classes: list[str]
  files: list[str]  # every file read (the images and the CSV): what the decoded cache depends on


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  # Hidden folders (.ipynb_checkpoints, ...) are not classes.
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _images_under(path: str) -> list[str]:
  """The image files under `path`, recursively, in sorted order (as torchvision's make_dataset walks them)."""
  out = []
  for parent, dirs, names in os.walk(path, followlinks=True):
    dirs.sort()
    out.extend(os.path.join(parent, n) for n in sorted(names) if _is_image(n))
  return out


def layout(root: str) -> str | None:
  """'csv', 'classes' (ImageFolder) or None when `root` holds neither."""
  if not os.path.isdir(root):
    return None
  if os.path.isdir(os.path.join(root, 'images')) and os.path.isfile(os.path.join(root, 'annotations.csv')):
    return 'csv'
  subdirs = _subdirs(root)
  if 'train' in subdirs:
    return 'classes'
  for d in subdirs:
    for _, _, names in os.walk(os.path.join(root, d), followlinks=True):
      if any(_is_image(n) for n in names):
        return 'classes'
  return None


def listing(root: str, cfg) -> Listing:
  """The images of the folder at `root` (a `config.data.folder` section gives the options), their labels and split."""
  kind = layout(root)
  if kind == 'csv':
    return _csv_listing(root, cfg)
  if kind == 'classes':
    return _class_listing(root, cfg)
  raise DatasetNotFoundError(f'folder dataset not found in {root}: expected {LAYOUTS}; set --config.data.dir '
                             '(or --config.data.folder.root)')


def read(lst: Listing, cfg) -> tuple[Split, Split]:
  """Decodes the images of a listing into (train, test)."""
  images = decode_all(lst.paths, cfg.get('image_size', 0))
  is_test = lst.is_test
  return Split(images[~is_test], lst.labels[~is_test]), Split(images[is_test], lst.labels[is_test])


def load_image(path: str, size: int) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as img:
      img = img.convert('RGB')
      if size:
        img = img.resize((size, size), Image.BILINEAR)
      return np.asarray(img, np.uint8)
  except OSError as e:  # PIL's UnidentifiedImageError and 'image file is truncated' are OSErrors
    raise ConfigError(f'corrupt file {path}: {" ".join(str(e).split())}') from None


def decode_all(paths: list[str], size: int) -> np.ndarray:
  """The images at `paths` as one uint8 [N, H, W, 3] array; images of different sizes need `size` > 0."""
  images = [load_image(p, size) for p in paths]
  first_of_shape = {}
  for path, image in zip(paths, images):
    first_of_shape.setdefault(image.shape, path)
  if len(first_of_shape) > 1:
    (a, path_a), (b, path_b) = list(first_of_shape.items())[:2]
    raise ConfigError(f'images of different sizes: {path_a} is {a[1]}x{a[0]}, {path_b} is {b[1]}x{b[0]}; set '
                      '--config.data.folder.image_size to resize them all')
  return np.stack(images)


def _stratified_test_mask(labels: np.ndarray, cfg) -> np.ndarray:
  from sklearn.model_selection import train_test_split
  _, test_idx = train_test_split(np.arange(len(labels)), test_size=cfg.get('test_fraction', 0.2),
                                 random_state=cfg.get('seed', 0), stratify=labels)
  return np.isin(np.arange(len(labels)), test_idx)


def _class_listing(root: str, cfg) -> Listing:
  subdirs = _subdirs(root)
  if 'train' in subdirs:
    test_name = 'test' if 'test' in subdirs else 'val' if 'val' in subdirs else None
    if test_name is None:
      raise DatasetNotFoundError(f'{root} has train/ but no test/ (or val/) beside it')
    parts = {'train': os.path.join(root, 'train'), 'test': os.path.join(root, test_name)}
    classes = _subdirs(parts['train'])
    extra = sorted(set(_subdirs(parts['test'])) - set(classes))
    if extra:
      raise ConfigError(f'{parts["test"]} has class folders that {parts["train"]} lacks: {", ".join(extra)}')
  else:
    parts, classes = {'all': root}, _subdirs(root)
  paths, labels, is_test = [], [], []
  for part, part_dir in parts.items():
    for label, name in enumerate(classes):
      class_dir = os.path.join(part_dir, name)
      found = _images_under(class_dir) if os.path.isdir(class_dir) else []
      if not found and part != 'test':
        raise DatasetNotFoundError(f'class folder {class_dir} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
      paths += found
      labels += [label] * len(found)
      is_test += [part == 'test'] * len(found)
  labels = np.array(labels, np.int32)
  is_test = _stratified_test_mask(labels, cfg) if 'all' in parts else np.array(is_test, bool)
  logging.info('image folder %s: %d classes, %d train / %d test images', root, len(classes),
               int((~is_test).sum()), int(is_test.sum()))
  return Listing(paths, labels, is_test, classes, list(paths))


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


def _csv_listing(root: str, cfg) -> Listing:
  images_dir, csv_path = os.path.join(root, 'images'), os.path.join(root, 'annotations.csv')
  rows = _read_csv(csv_path)
  if not rows:
    raise DatasetNotFoundError(f'{csv_path} lists no images')
  file_col, label_col = _pick_columns(rows, images_dir, cfg)
  classes = sorted({r[label_col] for r in rows})
  paths = [os.path.join(images_dir, r[file_col]) for r in rows]
  labels = np.array([classes.index(r[label_col]) for r in rows], np.int32)
  if 'Partition' in rows[0]:
    is_test = np.array([r['Partition'].strip().lower() == 'test' for r in rows])
  else:
    is_test = _stratified_test_mask(labels, cfg)
  logging.info('folder dataset %s: classes %s, %d train / %d test images', root, dict(enumerate(classes)),
               int((~is_test).sum()), int(is_test.sum()))
  return Listing(paths, labels, is_test, classes, paths + [csv_path])
