"""Datasets from the files users have (kdjax.data.files): each on-disk format written here byte for byte as
torchvision's downloads hold it, read back through `kdjax.data.load`, and every refusal as one line."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import errors
from kdjax.data import files
from tests.util import real_data

FASHION = data_lib.DEBIAN_FASHION_MNIST


def _cfg(name, root, tmp_path, **kw):
  c = config_lib.base().data
  c.update(name=name, dir=str(root), cache_dir=str(tmp_path / 'cache'))
  folder_kw = {k[len('folder_'):]: kw.pop(k) for k in list(kw) if k.startswith('folder_')}
  c.update(kw)
  c.folder.update(folder_kw)
  return c


def _pickle(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=2)  # the protocol of the published files


def _cifar_rows(rng, n):
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar10(where, rng, per_batch=3, n_test=4):
  """cifar-10-batches-py as torchvision downloads it: 5 training batches, a test batch and batches.meta."""
  train = [(_cifar_rows(rng, per_batch), [int(x) for x in rng.integers(0, 10, per_batch)]) for _ in range(5)]
  test = (_cifar_rows(rng, n_test), [int(x) for x in rng.integers(0, 10, n_test)])
  for i, (rows, labels) in enumerate(train):
    _pickle(where / f'data_batch_{i + 1}', {b'batch_label': f'training batch {i + 1} of 5'.encode(), b'labels': labels,
                                            b'data': rows, b'filenames': [b'x.png'] * len(labels)})
  _pickle(where / 'test_batch', {b'batch_label': b'testing batch 1 of 1', b'labels': test[1], b'data': test[0],
                                 b'filenames': [b'x.png'] * n_test})
  _pickle(where / 'batches.meta', {b'num_cases_per_batch': per_batch, b'num_vis': 3072,
                                   b'label_names': [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog',
                                                    b'frog', b'horse', b'ship', b'truck']})
  return (np.concatenate([r for r, _ in train]), np.concatenate([l for _, l in train])), (test[0], np.array(test[1]))


def _write_cifar100(where, rng, n_train=6, n_test=4):
  out = []
  for name, n in (('train', n_train), ('test', n_test)):
    rows, fine = _cifar_rows(rng, n), rng.integers(0, 100, n)
    coarse = fine // 5
    _pickle(where / name, {b'filenames': [b'x.png'] * n, b'batch_label': name.encode(), b'data': rows,
                           b'fine_labels': [int(x) for x in fine], b'coarse_labels': [int(x) for x in coarse]})
    out.append((rows, fine, coarse))
  _pickle(where / 'meta', {b'fine_label_names': [f'f{i}'.encode() for i in range(100)],
                           b'coarse_label_names': [f'c{i}'.encode() for i in range(20)]})
  return out


def _assert_chw_rows_as_hwc(images, rows):
  """Pixel by pixel: image[n, y, x, c] is row[n, c * 1024 + y * 32 + x] (CIFAR's channel planes, each row-major)."""
  assert images.shape == (len(rows), 32, 32, 3) and images.dtype == np.uint8
  for c in range(3):
    for y in range(32):
      for x in range(32):
        np.testing.assert_array_equal(images[:, y, x, c], rows[:, c * 1024 + y * 32 + x])


def _write_idx(path, array, gz=False, cut=0, extra=b'', damage=None):
  """IDX: a big-endian magic (0x0803 for 3-d unsigned bytes, 0x0801 for 1-d), big-endian int32 sizes, the bytes."""
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = struct.pack('>I', 0x800 | array.ndim) + struct.pack(f'>{array.ndim}i', *array.shape)
  payload += array.astype(np.uint8).tobytes() + extra
  if cut and not gz:
    payload = payload[:-cut]
  raw = gzip.compress(payload) if gz else payload
  if cut and gz:
    raw = raw[:-cut]
  if damage is not None:  # flip a bit of the compressed bytes (-6: the gzip trailer's CRC)
    raw = bytearray(raw)
    raw[damage] ^= 1
    raw = bytes(raw)
  path.write_bytes(raw)
  return path


def _write_mnist(where, rng, gz=False, n_train=7, n_test=5, test_shape=(28, 28), classes=10):
  suffix = '.gz' if gz else ''
  arrays = {}
  for split, prefix, n, shape in (('train', 'train', n_train, (28, 28)), ('test', 't10k', n_test, test_shape)):
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    _write_idx(where / f'{prefix}-images-idx3-ubyte{suffix}', images, gz)
    _write_idx(where / f'{prefix}-labels-idx1-ubyte{suffix}', labels, gz)
    arrays[split] = (images, labels)
  return arrays


def _write_png_folder(root, rng, classes=('zebra', 'cat', 'dog'), per_class=4, size=(6, 5)):
  """torchvision's ImageFolder: root/<class>/<image>; returns {class: [arrays in file-name order]}."""
  written = {}
  for name in classes:
    (root / name).mkdir(parents=True)
    written[name] = []
    for i in range(per_class):
      image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
      Image.fromarray(image).save(root / name / f'{i:03d}.png')
      written[name].append(image)
  return written


def _load_error(cfg, error=errors.ConfigError):
  with pytest.raises(error) as e:
    data_lib.load(cfg)
  message = str(e.value)
  assert '\n' not in message, message
  return message


def _snapshot(root):
  return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*'))


def _no_cache_written(tmp_path):
  assert not (tmp_path / 'cache').exists()


def test_cifar10_pickles_chw_to_hwc_from_root_or_folder_and_cached(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  root = tmp_path / 'torchvision'
  (train_rows, train_labels), (test_rows, test_labels) = _write_cifar10(root / 'cifar-10-batches-py', rng)
  ds = data_lib.load(_cfg('cifar10', root, tmp_path))
  _assert_chw_rows_as_hwc(ds.train.images, train_rows)
  _assert_chw_rows_as_hwc(ds.test.images, test_rows)
  np.testing.assert_array_equal(ds.train.labels, train_labels)
  np.testing.assert_array_equal(ds.test.labels, test_labels)
  assert ds.train.labels.dtype == np.int32 and ds.num_classes == 10 and ds.augment == 'crop_flip'
  assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465))  # the published statistics, not the files'
  assert len(list((tmp_path / 'cache').glob('cifar10-*/*.npz'))) == 2

  def no_decoding(*args):
    raise AssertionError('decoded again')

  monkeypatch.setattr(files, '_read_cifar', no_decoding)
  again = data_lib.load(_cfg('cifar10', root, tmp_path))  # from the cache
  np.testing.assert_array_equal(again.train.images, ds.train.images)
  monkeypatch.undo()
  direct = data_lib.load(_cfg('cifar10', root / 'cifar-10-batches-py', tmp_path))  # DIR = torchvision's folder
  np.testing.assert_array_equal(direct.test.images, ds.test.images)
  (tmp_path / 'not_a_dir').write_text('')
  unwritable = _cfg('cifar10', root, tmp_path, cache_dir=str(tmp_path / 'not_a_dir' / 'cache'))
  np.testing.assert_array_equal(data_lib.load(unwritable).train.labels, train_labels)  # no cache, no error


def test_cifar100_fine_labels_by_default_coarse_by_label_set(tmp_path):
  rng = np.random.default_rng(1)
  (train_rows, fine, coarse), (test_rows, test_fine, test_coarse) = _write_cifar100(tmp_path / 'cifar-100-python',
                                                                                    rng)
  ds = data_lib.load(_cfg('cifar100', tmp_path, tmp_path))
  assert ds.num_classes == 100 and ds.image_shape == (32, 32, 3)
  _assert_chw_rows_as_hwc(ds.train.images, train_rows)
  np.testing.assert_array_equal(ds.train.labels, fine)
  np.testing.assert_array_equal(ds.test.labels, test_fine)
  ds = data_lib.load(_cfg('cifar100', tmp_path / 'cifar-100-python', tmp_path, label_set='coarse'))
  assert ds.num_classes == 20
  np.testing.assert_array_equal(ds.train.labels, coarse)
  np.testing.assert_array_equal(ds.test.labels, test_coarse)
  _assert_chw_rows_as_hwc(ds.test.images, test_rows)


@pytest.mark.parametrize('name,where,gz', [
    ('mnist', 'MNIST/raw', False), ('fashion_mnist', 'FashionMNIST/raw', True), ('kmnist', 'KMNIST/raw', True),
    ('mnist', 'raw', True), ('fashion_mnist', '.', False),
])
def test_idx_files_raw_and_gzipped_in_torchvision_layouts(tmp_path, name, where, gz):
  rng = np.random.default_rng(2)
  root = tmp_path / 'data'
  arrays = _write_mnist(root / where, rng, gz=gz)
  ds = data_lib.load(_cfg(name, root, tmp_path))
  for split, (images, labels) in zip((ds.train, ds.test), (arrays['train'], arrays['test'])):
    assert split.images.shape == images.shape + (1,) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images[..., 0], images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.labels.dtype == np.int32
  assert ds.num_classes == 10 and ds.augment == 'none'


def test_image_folder_with_train_and_test_and_with_a_seeded_split(tmp_path):
  rng = np.random.default_rng(3)
  root = tmp_path / 'pets'
  train = _write_png_folder(root / 'train', rng)
  test = _write_png_folder(root / 'test', rng, classes=('dog', 'cat'), per_class=2)  # a class may be absent
  ds = data_lib.load(_cfg('folder', root, tmp_path))
  assert ds.num_classes == 3 and ds.image_shape == (6, 5, 3)  # H x W of a 5-wide, 6-high PNG
  # Sorted class names, as torchvision's ImageFolder; train/'s indices for test/ too: cat 0, dog 1, zebra 2.
  np.testing.assert_array_equal(ds.train.labels, [0] * 4 + [1] * 4 + [2] * 4)
  np.testing.assert_array_equal(ds.test.labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(ds.train.images, np.stack(train['cat'] + train['dog'] + train['zebra']))
  np.testing.assert_array_equal(ds.test.images, np.stack(test['cat'] + test['dog']))

  flat = tmp_path / 'flat'
  _write_png_folder(flat, rng, classes=('b', 'a'), per_class=5)
  cfg = _cfg('folder', '', tmp_path, folder_root=str(flat), folder_test_fraction=0.2)  # the older field
  ds = data_lib.load(cfg)
  assert (len(ds.train), len(ds.test)) == (8, 2) and sorted(ds.test.labels) == [0, 1]  # stratified
  again = data_lib.load(_cfg('folder', flat, tmp_path, folder_test_fraction=0.2))
  np.testing.assert_array_equal(again.test.images, ds.test.images)  # seeded
  Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(flat / 'a' / 'big.png')
  resized = data_lib.load(_cfg('folder', flat, tmp_path, folder_image_size=4))
  assert resized.image_shape == (4, 4, 3) and len(resized.train) + len(resized.test) == 11


def test_the_csv_folder_layout_is_still_read(tmp_path):
  (tmp_path / 'images').mkdir()
  rows = ['Image Name,Majority Vote Label,Partition']
  for i in range(6):
    Image.fromarray(np.full((3, 3, 3), i, np.uint8)).save(tmp_path / 'images' / f'{i}.png')
    rows.append(f'{i}.png,{"SSA" if i % 2 else "HP"},{"test" if i >= 4 else "train"}')
  (tmp_path / 'annotations.csv').write_text('\n'.join(rows) + '\n')
  ds = data_lib.load(_cfg('folder', tmp_path, tmp_path))
  np.testing.assert_array_equal(ds.train.labels, [0, 1, 0, 1])
  np.testing.assert_array_equal(ds.test.images[:, 0, 0, 0], [4, 5])


def test_a_directory_in_no_known_format_lists_what_was_looked_for(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.txt').write_text('hi')
  for root in (tmp_path / 'empty', tmp_path / 'missing'):
    message = _load_error(_cfg('cifar10', root, tmp_path), errors.DatasetNotFoundError)
    assert message.startswith(f'no dataset found in {root}')
    for name in ('cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}', 'cifar-100-python/{train, test',
                 'train-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'FashionMNIST/raw/', 'annotations.csv',
                 'one subfolder of images per class'):
      assert name in message
  assert (tmp_path / 'missing').exists() is False  # nothing created
  _no_cache_written(tmp_path)


def test_refusals_name_the_dataset_and_the_setting(tmp_path):
  rng = np.random.default_rng(4)
  _write_cifar100(tmp_path / 'tv' / 'cifar-100-python', rng)
  message = _load_error(_cfg('cifar10', tmp_path / 'tv', tmp_path))
  assert message.startswith("data.name is 'cifar10' but") and '--config.data.name to cifar100' in message
  _write_mnist(tmp_path / 'm' / 'raw', rng)
  message = _load_error(_cfg('folder', tmp_path / 'm', tmp_path))
  assert message.startswith("data.name is 'folder' but") and 'one of mnist, fashion_mnist, kmnist' in message
  assert _load_error(_cfg('mnist', tmp_path / 'm', tmp_path, label_set='coarse')).startswith(
      "data.label_set='coarse' applies to cifar100 only")
  assert _load_error(_cfg('cifar100', tmp_path / 'tv', tmp_path, label_set='super')).startswith(
      'data.label_set must be one of fine, coarse')
  assert _load_error(_cfg('digits', tmp_path / 'm', tmp_path)).startswith('data.dir=')
  assert _load_error(_cfg('kmnist', '', tmp_path)).startswith(
      "kmnist is read from torchvision's files: set --config.data.dir to the folder that holds KMNIST/raw")
  os.remove(tmp_path / 'tv' / 'cifar-100-python' / 'meta')
  message = _load_error(_cfg('cifar100', tmp_path / 'tv', tmp_path), errors.DatasetNotFoundError)
  assert message.startswith('incomplete cifar100 files in') and message.endswith('missing meta')
  _no_cache_written(tmp_path)


def test_truncated_and_corrupt_files_name_the_file_and_the_sizes(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  labels = np.array([1, 2, 3], np.uint8)
  cases = [  # (writer, expected start, sizes the message gives)
      (lambda d: _write_idx(d / 'train-images-idx3-ubyte', images, cut=100), 'truncated file', ('2,368', '2,268')),
      (lambda d: _write_idx(d / 'train-images-idx3-ubyte.gz', images, gz=True, cut=30), 'truncated file',
       ('expected 2,368 bytes after decompression', 'found 2,346', 'the gzip stream ends early')),
      (lambda d: _write_idx(d / 'train-images-idx3-ubyte.gz', images, gz=True, damage=-6), 'corrupt file',
       ('gzip data is damaged (', 'incorrect data check', 'expected 2,368 bytes after decompression')),
      (lambda d: _write_idx(d / 'train-images-idx3-ubyte', images, extra=b'xx'), 'corrupt file', ('2,368', '2,370')),
      (lambda d: _write_idx(d / 'train-images-idx3-ubyte', labels), 'corrupt file',
       ('magic number 0x00000801, expected 0x00000803',)),
  ]
  for i, (write, start, sizes) in enumerate(cases):
    where = tmp_path / f'case{i}'
    _write_mnist(where, rng)
    for f in where.glob('train-images-idx3-ubyte*'):
      f.unlink()
    bad = write(where)
    before = _snapshot(where)
    message = _load_error(_cfg('mnist', where, tmp_path))
    assert message.startswith(f'{start} {bad}:'), message
    for size in sizes:
      assert size in message, message
    assert _snapshot(where) == before  # nothing written over
  _no_cache_written(tmp_path)


def test_truncated_and_corrupt_cifar_pickles(tmp_path):
  rng = np.random.default_rng(6)
  where = tmp_path / 'cifar-10-batches-py'
  _write_cifar10(where, rng)
  batch = where / 'data_batch_2'
  full = batch.read_bytes()
  batch.write_bytes(full[:len(full) // 2])
  message = _load_error(_cfg('cifar10', tmp_path, tmp_path))
  assert message.startswith(f'truncated file {batch}: expected at least ')
  assert f'found {len(full) // 2:,}' in message
  need = int(message.split('at least ')[1].split(' bytes')[0].replace(',', ''))
  assert len(full) // 2 < need <= len(full)
  batch.write_bytes(b'\x00 not a pickle')
  assert _load_error(_cfg('cifar10', tmp_path, tmp_path)).startswith(f'corrupt file {batch} (14 bytes): ')
  _pickle(batch, {b'data': _cifar_rows(rng, 3)[:, :3000], b'labels': [0, 1, 2]})
  message = _load_error(_cfg('cifar10', tmp_path, tmp_path))
  assert message.startswith(f'corrupt file {batch}: expected 3 x 3072 = 9,216 bytes') and 'found 9,000' in message
  _no_cache_written(tmp_path)


def test_labels_out_of_range_name_the_file(tmp_path):
  rng = np.random.default_rng(7)
  where = tmp_path / 'cifar-10-batches-py'
  _write_cifar10(where, rng)
  _pickle(where / 'test_batch', {b'data': _cifar_rows(rng, 2), b'labels': [3, 10]})
  message = _load_error(_cfg('cifar10', tmp_path, tmp_path))
  assert message.startswith(f'labels out of range in {where / "test_batch"}: 1 outside 0..9, the first 10')
  _write_mnist(tmp_path / 'MNIST' / 'raw', rng, gz=True, classes=12)
  message = _load_error(_cfg('mnist', tmp_path, tmp_path))
  assert message.startswith(f'labels out of range in {tmp_path / "MNIST" / "raw"}/train-labels-idx1-ubyte.gz')
  _no_cache_written(tmp_path)


def test_mixed_image_sizes_in_a_folder_and_train_test_shapes(tmp_path):
  rng = np.random.default_rng(8)
  root = tmp_path / 'f'
  _write_png_folder(root, rng, classes=('a', 'b'), per_class=3)
  Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(root / 'b' / 'odd.png')
  message = _load_error(_cfg('folder', root, tmp_path))
  assert message.startswith(f'images of different sizes: {root}/a/000.png is 5x6, {root}/b/odd.png is 9x7; set '
                            '--config.data.folder.image_size')
  _write_mnist(tmp_path / 'm', rng, test_shape=(14, 14))
  message = _load_error(_cfg('mnist', tmp_path / 'm', tmp_path))
  assert message.startswith('train and test images differ in shape: (28, 28, 1) in ')
  assert 't10k-images-idx3-ubyte' in message and '(14, 14, 1)' in message
  _no_cache_written(tmp_path)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
  monkeypatch.setattr(data_lib, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'no_debian_package'))
  c = config_lib.base().data
  c.update(name='fashion_mnist', data_dir=str(tmp_path))
  message = _load_error(c, errors.DatasetNotFoundError)
  assert message.startswith("dataset 'fashion_mnist' is not prepared in")
  assert 'apt-get install dataset-fashion-mnist' in message


def test_real_fashion_mnist_from_the_debian_package(tmp_path):
  real_data(FASHION)  # .ci/run installs it
  c = config_lib.base().data
  c.update(name='fashion_mnist', cache_dir=str(tmp_path / 'cache'))
  for ds in (data_lib.load(c), data_lib.load(c)):  # decoded, then from the cache
    assert (len(ds.train), len(ds.test)) == (60_000, 10_000) and ds.num_classes == 10
    assert ds.image_shape == (28, 28, 1) and ds.train.images.dtype == np.uint8 and ds.test.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ds.train.labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels, minlength=10), [1000] * 10)
  assert ds.mean == pytest.approx((0.2860,)) and ds.std == pytest.approx((0.3530,))
  # The published statistics are these files' own.
  assert ds.train.images.mean() / 255 == pytest.approx(0.2860, abs=1e-4)


def test_coarse_labels_through_tfds_too():
  import tensorflow_datasets as tfds
  c = config_lib.base().data
  c.update(name='cifar100', label_set='coarse')
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data_lib.load(c)
  assert ds.num_classes == 20 and 0 <= ds.train.labels.min() and ds.train.labels.max() < 20
