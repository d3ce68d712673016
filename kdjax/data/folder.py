"""Datasets read from a folder of images, in one of two layouts (chosen by what the root holds):

- `root/images/*` plus `root/annotations.csv` (the layout MHIST ships in). The CSV names each image and its label;
  columns are picked by `label_column` / `file_column`, or found automatically (the file column is the one whose
  values name files in images/, the label column MHIST's 'Majority Vote Label' or else the next text column). A
  'Partition' column with train/test values is honoured.
- torchvision's ImageFolder: one subfolder of images per class, either under `root/train/` and `root/test/` (or
  `root/val/`) or directly in `root`.

Class folders are walked as torchvision does (symlinks followed), except that a symlinked folder that leads back
into the dataset's folder (or to one walked already) is not followed, with a warning: such a link would count
images again, and a loop of links without end. A symlinked image that leads nowhere, a CSV that is not UTF-8, a
dataset of one class and a class too small for the stratified split are refused in one line.

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
_WARNED_LINKS = set()  # the symlinks not followed that a warning named already (a folder is listed more than once)


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


def _images_under(path: str, tree: str) -> list[str]:
  """The image files under `path`, recursively, in sorted order (as torchvision's make_dataset walks them)."""
  return [f for _, files in _walk(path, tree) for f in files if _is_image(os.path.basename(f))]


def _walk(top: str, tree: str):
  """(directory, its files) under `top`, top-down in sorted order (os.walk with followlinks=True, dirs sorted),
  except that a symlinked directory is followed only when it leads out of `tree` (the dataset's folder) to a
  directory not walked yet: a link back into the tree (`cat/up -> ..`) would count the images it reaches again, a
  loop of links without end. A symlinked image that leads nowhere is refused in one line."""
  tree, seen, stack = os.path.realpath(tree), set(), [top]
  while stack:
    where = stack.pop()
    real = os.path.realpath(where)
    if real in seen:
      continue
    seen.add(real)
    files, dirs = [], []
    try:
      entries = sorted(os.scandir(where), key=lambda e: e.name)
    except OSError as e:
      raise ConfigError(f'cannot list the folder {where}: {e.strerror or e}') from None
    for e in entries:
      if not e.is_dir():  # follows a symlink
        if e.is_symlink() and not os.path.exists(e.path) and _is_image(e.name):
          raise ConfigError(f'dangling symlink {e.path} -> {os.readlink(e.path)}: the image it names does not exist')
        files.append(e.path)
      elif not e.is_symlink():
        dirs.append(e.path)
      else:
        target = os.path.realpath(e.path)
        if target == tree or target.startswith(tree + os.sep) or target in seen:
          if e.path not in _WARNED_LINKS:
            _WARNED_LINKS.add(e.path)
            logging.warning('not following the symlink %s -> %s: it leads back into %s or to a folder already '
                            'walked', e.path, target, tree)
        else:
          dirs.append(e.path)
    yield where, files
    stack.extend(reversed(dirs))


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
    for _, files in _walk(os.path.join(root, d), root):
      if any(_is_image(os.path.basename(f)) for f in files):
        return 'classes'
  return None


def listing(root: str, cfg) -> Listing:
  """The images of the folder at `root` (a `config.data.folder` section gives the options), their labels and split."""
  _check_options(cfg)
  kind = layout(root)
  if kind == 'csv':
    return _csv_listing(root, cfg)
  if kind == 'classes':
    return _class_listing(root, cfg)
  raise DatasetNotFoundError(f'folder dataset not found in {root}: expected {LAYOUTS}; set --config.data.dir '
                             '(or --config.data.folder.root)')


def read(lst: Listing, cfg) -> tuple[Split, Split]:
  """Decodes the images of a listing into (train, test)."""
  images = decode_all(lst.paths, cfg.image_size)
  is_test = lst.is_test
  return Split(images[~is_test], lst.labels[~is_test]), Split(images[is_test], lst.labels[is_test])


def load_image(path: str, size: int) -> np.ndarray:
  """The image at `path` as uint8 [H, W, 3] RGB (resized to size x size, bilinear, if `size`): decoded by the
  streaming path's `transforms.open_image`, so an unreadable, truncated or decompression-bomb file is refused the
  same way, here in one line naming it."""
  from PIL import Image
  from kdjax.data import transforms
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ConfigError(f'cannot read the image {path}: {e.strerror or e}') from None
  try:
    img = transforms.open_image(data)
  except transforms.CorruptImage as e:
    raise ConfigError(f'corrupt file {path}: {e}') from None
  if size:
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


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


def _stratified_test_mask(labels: np.ndarray, cfg, root: str, classes: list[str]) -> np.ndarray:
  from kdjax.data import stratified_split
  fraction = cfg.test_fraction
  _, test_idx = stratified_split(labels, cfg.seed, f'the data.folder.test_fraction={fraction} split of '
                                 f'{root}', names=[repr(c) for c in classes], test_size=fraction)
  return np.isin(np.arange(len(labels)), test_idx)


def _check_options(cfg):
  fraction = cfg.test_fraction
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
    raise ConfigError(f'config.data.folder.test_fraction must be in (0, 1), got {fraction!r}')


def _check_classes(root: str, classes: list[str]):
  if len(classes) < 2:
    raise ConfigError(f'the folder dataset {root} has {len(classes)} class ({", ".join(map(repr, classes))}); '
                      'knowledge distillation needs at least 2')


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
  _check_classes(root, classes)
  paths, labels, is_test = [], [], []
  for part, part_dir in parts.items():
    for label, name in enumerate(classes):
      class_dir = os.path.join(part_dir, name)
      found = _images_under(class_dir, root) if os.path.isdir(class_dir) else []
      if not found and part != 'test':
        raise DatasetNotFoundError(f'class folder {class_dir} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
      paths += found
      labels += [label] * len(found)
      is_test += [part == 'test'] * len(found)
  labels = np.array(labels, np.int32)
  is_test = _stratified_test_mask(labels, cfg, root, classes) if 'all' in parts else np.array(is_test, bool)
  logging.info('image folder %s: %d classes, %d train / %d test images', root, len(classes),
               int((~is_test).sum()), int(is_test.sum()))
  return Listing(paths, labels, is_test, classes, list(paths))


def _read_csv(path: str) -> list[dict]:
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: the byte-order mark spreadsheets write
      return list(csv.DictReader(f))
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start:,}); save it '
                      'as UTF-8') from None
  except csv.Error as e:
    raise ConfigError(f'{path} is not a readable CSV file: {e}') from None


def _pick_columns(rows: list[dict], images_dir: str, cfg) -> tuple[str, str]:
  columns = list(rows[0])
  file_col = cfg.file_column or next(
      (c for c in columns if isinstance(rows[0][c], str) and os.path.isfile(os.path.join(images_dir, rows[0][c]))),
      None)
  if file_col is None or file_col not in columns:
    raise ConfigError(f'cannot find the image-file column in {columns}; set data.folder.file_column')
  label_col = cfg.label_column or ('Majority Vote Label' if 'Majority Vote Label' in columns else next(
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
  for n, r in enumerate(rows):
    if r[file_col] is None or r[label_col] is None:  # csv leaves the fields a short row lacks as None
      raise ConfigError(f'{csv_path}: row {n + 2} has no {file_col if r[file_col] is None else label_col!r} field')
    if not os.path.isfile(os.path.join(images_dir, r[file_col])):
      raise ConfigError(f'{csv_path}: row {n + 2} names {r[file_col]!r}, which is not a file in {images_dir}')
  classes = sorted({r[label_col] for r in rows})
  _check_classes(root, classes)
  paths = [os.path.join(images_dir, r[file_col]) for r in rows]
  labels = np.array([classes.index(r[label_col]) for r in rows], np.int32)
  if 'Partition' in rows[0]:
    is_test = np.array([r['Partition'].strip().lower() == 'test' for r in rows])
  else:
    is_test = _stratified_test_mask(labels, cfg, root, classes)
  logging.info('folder dataset %s: classes %s, %d train / %d test images', root, dict(enumerate(classes)),
               int((~is_test).sum()), int(is_test.sum()))
  return Listing(paths, labels, is_test, classes, paths + [csv_path])
