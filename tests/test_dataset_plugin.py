"""A dataset in one entry (kdjax/data/registry.py): added from outside kdjax, trained through the normal run loop, and
read by everything that names datasets (data.load, files, stream.choose / check_config, validate)."""

import importlib.util
import json

import numpy as np
import pytest

from kdjax import data
from kdjax import errors
from kdjax import train
from kdjax import validate
from kdjax.data import files
from kdjax.data import readers
from kdjax.data import stream
from tests.test_data_files import _write_mnist
from tests.util import digits_config

# The whole of a user's dataset module: one function that makes the arrays, one entry.
MODULE = '''
"""scikit-learn's digits upside down: a dataset of one's own, in one entry."""
import numpy as np
from kdjax import data


def upside_down_digits(cfg):
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.round(d.images[:, ::-1] * (255 / 16)).astype(np.uint8)  # [N, 8, 8]: one channel
  return (images[:1400], d.target[:1400]), (images[1400:], d.target[1400:]), 10


data.register(data.DatasetEntry('mine', (data.readers.Arrays(upside_down_digits, 'digits upside down'),)))
'''


@pytest.fixture
def registry_restored():
  """The registry as it was before the test (entries registered by a test do not leak into others)."""
  before = dict(data.DATASETS)
  yield
  data.DATASETS.clear()
  data.DATASETS.update(before)


def _import(path):
  spec = importlib.util.spec_from_file_location('my_dataset', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_dataset_added_by_one_entry_trains(tmp_path, registry_restored):
  cfg = digits_config('cnn_small', epochs=1)
  cfg.data.name = 'mine'
  with pytest.raises(errors.ConfigError, match=r"^unknown dataset 'mine'; choose one of digits, .*folder$"):
    validate.check(cfg)
  (tmp_path / 'my_dataset.py').write_text(MODULE)
  _import(tmp_path / 'my_dataset.py')  # nothing in kdjax/ edited: the module registers its entry
  validate.check(cfg)

  ds = data.load(cfg.data)
  from sklearn.datasets import load_digits
  flipped = np.round(load_digits().images[:, ::-1] * (255 / 16)).astype(np.uint8)
  np.testing.assert_array_equal(ds.train.images[..., 0], flipped[:1400])
  assert (ds.name, ds.num_classes, ds.image_shape, len(ds.test), ds.augment) == ('mine', 10, (8, 8, 1), 397, 'none')
  pixels = flipped[:1400].astype(np.float64) / 255.0  # no statistics declared: the training images' own
  assert ds.mean == pytest.approx((pixels.mean(),)) and ds.std == pytest.approx((pixels.std(),))

  summary = train.run(cfg, str(tmp_path / 'run'))
  assert summary['test_count'] == 397
  assert summary['test_accuracy'] > 0.3  # chance is 0.1: it learnt the upside-down digits in 21 steps
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['data']['name'] == 'mine'


def test_an_entry_declares_statistics_augmentation_files_and_pipeline(tmp_path, registry_restored):
  stats = ((0.5,), (0.25,))
  data.register(data.DatasetEntry('emnist_digits', (readers.IdxFiles('EMNIST/raw'), readers.ImageFolder()),
                                  stats=stats, augment='crop_flip', num_classes=10, title='EMNIST'))
  root = tmp_path / 'torchvision'
  arrays = _write_mnist(root / 'EMNIST' / 'raw', np.random.default_rng(0), gz=True)
  c = data.load(_data_cfg('emnist_digits', root, tmp_path))
  np.testing.assert_array_equal(c.train.images[..., 0], arrays['train'][0])
  assert (c.mean, c.std, c.augment, c.num_classes) == ((0.5,), (0.25,), 'crop_flip', 10)
  assert len(list((tmp_path / 'cache').glob('emnist_digits-*/*.npz'))) == 2  # cached like the built-in files

  # files.py knows its layout from the entry: another dataset's name on its folder is refused naming it.
  with pytest.raises(errors.ConfigError) as e:
    data.load(_data_cfg('mnist', root, tmp_path))
  assert str(e.value) == (f"data.name is 'mnist' but {root} holds emnist_digits files ({root}/EMNIST/raw); set "
                          '--config.data.name to emnist_digits')
  with pytest.raises(errors.DatasetNotFoundError) as e:
    data.load(_data_cfg('emnist_digits', tmp_path / 'empty', tmp_path))
  assert 'MNIST, Fashion-MNIST, KMNIST, EMNIST: {train-images-idx3-ubyte' in str(e.value)
  assert 'KMNIST/raw/ or EMNIST/raw/' in str(e.value)
  with pytest.raises(errors.ConfigError, match=r"^emnist_digits is read from torchvision's files: set "
                                               r'--config.data.dir to the folder that holds EMNIST/raw$'):
    data.load(_data_cfg('emnist_digits', '', tmp_path))

  # The pipelines: a device-only entry is refused by the stream pipeline; a streamed one by the device pipeline.
  cfg = digits_config('cnn_small')
  cfg.data.update(name='emnist_digits', pipeline='stream')
  with pytest.raises(errors.ConfigError, match=r"^config.data.pipeline='stream' reads imagenet2012 or folder, not "
                                               r'emnist_digits; '):
    validate.check(cfg)
  data.register(data.DatasetEntry('my_photos', (readers.ImageFolder(),), pipeline='stream'))
  cfg.data.update(name='my_photos', pipeline='auto')
  assert stream.choose(cfg.data) == 'stream'
  cfg.data.pipeline = 'device'
  with pytest.raises(errors.ConfigError, match=r"^config.data.pipeline='device' cannot hold my_photos on the "):
    validate.check(cfg)
  assert data.registry.stream_names() == ('imagenet2012', 'folder', 'my_photos')
  assert files.looked_for().count('a folder of images') == 1


def _data_cfg(name, root, tmp_path):
  c = digits_config().data
  c.update(name=name, dir=str(root), cache_dir=str(tmp_path / 'cache'))
  return c


def test_bad_entries_and_bad_arrays_are_one_line(tmp_path, registry_restored):
  arrays = readers.Arrays(lambda cfg: ((np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1])),) * 2 + (2,))
  bad = [
      (dict(name='digits', readers=(arrays,)), "dataset entry 'digits' is registered already; pass replace=True"),
      (dict(name='x', readers=(arrays,), augment='mixup'), "dataset entry 'x': augment must be one of crop_flip, none"),
      (dict(name='x', readers=(arrays,), stats=((0.5,), (0.0,))), "dataset entry 'x': stats must be ((mean per "),
      (dict(name='x', readers=(readers.IdxFiles('X/raw'),)), "dataset entry 'x': its IDX files do not say how many"),
      (dict(name='x', readers=(arrays,), pipeline='stream'), "dataset entry 'x': pipeline='stream' needs a reader "),
      (dict(name='x', readers=(lambda cfg: None,)), "dataset entry 'x': readers must be a non-empty tuple of "),
  ]
  for kw, message in bad:
    with pytest.raises(errors.ConfigError) as e:
      data.register(data.DatasetEntry(**kw))
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)
    assert 'x' not in data.DATASETS

  data.register(data.DatasetEntry('tiny', (arrays,)))
  assert data.load(_data_cfg('tiny', '', tmp_path)).num_classes == 2
  for images, labels, message in [
      (np.zeros((4, 2, 2), np.float32), np.array([0, 1, 0, 1]), "the train split of <lambda>() images must be uint8"),
      (np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 2]), '1 train labels outside 0..1, the first 2'),
  ]:
    made = readers.Arrays(lambda cfg, i=images, l=labels: ((i, l), (i[:2], l[:2]), 2))
    data.register(data.DatasetEntry('tiny', (made,)), replace=True)
    with pytest.raises(errors.ConfigError) as e:
      data.load(_data_cfg('tiny', '', tmp_path))
    assert str(e.value).startswith(f"dataset 'tiny': {message}"), str(e.value)
  with pytest.raises(errors.ConfigError, match=r"^data.dir=/somewhere but tiny is made by a function, not read from "
                                               r'files; set data.name to one of cifar10, .*folder for the files there$'):
    data.load(_data_cfg('tiny', '/somewhere', tmp_path))
