"""The image-folder dataset (MHIST's layout: images/ + annotations.csv)."""

import csv

import numpy as np
import pytest
from PIL import Image

from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import errors


def _make_folder(root, n=12, partition=True, size=(10, 12)):
  (root / 'images').mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    label = 'SSA' if i % 3 == 0 else 'HP'
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / 'images' / f'img{i}.png')
    row = {'Image Name': f'img{i}.png', 'Majority Vote Label': label, 'Number of Annotators': str(i % 7)}
    if partition:
      row['Partition'] = 'test' if i >= 8 else 'train'
    rows.append(row)
  with open(root / 'annotations.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _cfg(root, **kw):
  c = config_lib.base().data
  c.name = 'folder'
  c.folder.root = str(root)
  c.cache_dir = str(root.parent / f'{root.name}_cache')  # not ~/.cache
  c.folder.update(kw)
  return c


def test_mhist_layout_with_partition_column(tmp_path):
  _make_folder(tmp_path)
  ds = data_lib.load(_cfg(tmp_path, image_size=8))
  assert ds.num_classes == 2 and ds.image_shape == (8, 8, 3)
  assert (len(ds.train), len(ds.test)) == (8, 4)
  # Labels indexed in sorted order: HP -> 0, SSA -> 1; img0, img3, img6 are SSA in train.
  np.testing.assert_array_equal(ds.train.labels, [1, 0, 0, 1, 0, 0, 1, 0])
  assert ds.train.images.dtype == np.uint8 and len(ds.mean) == 3


def test_seeded_split_without_partition_and_explicit_columns(tmp_path):
  _make_folder(tmp_path, partition=False)
  ds = data_lib.load(_cfg(tmp_path, test_fraction=0.25, label_column='Majority Vote Label',
                          file_column='Image Name'))
  assert (len(ds.train), len(ds.test)) == (9, 3) and ds.image_shape == (10, 12, 3)
  assert sorted(np.bincount(ds.test.labels)) == [1, 2]  # stratified


def test_folder_errors(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError, match='no dataset found in .*images/ and annotations.csv'):
    data_lib.load(_cfg(tmp_path / 'missing'))
  _make_folder(tmp_path)
  with pytest.raises(errors.ConfigError, match='label column'):
    data_lib.load(_cfg(tmp_path, label_column='Diagnosis'))
