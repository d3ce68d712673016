"""Datasets: digits, the validation split, the real TFDS path under mock data, on-device augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import errors
from kdjax import step as step_lib
from kdjax import train
from kdjax.data import device as device_data
from tests.util import digits_config


def _data_cfg(**kw):
  c = config_lib.base().data
  c.update(kw)
  return c


def test_digits_split_is_fixed_stratified_and_real():
  a, b = data_lib.load(_data_cfg(name='digits')), data_lib.load(_data_cfg(name='digits'))
  assert (len(a.train), len(a.test), a.num_classes) == (1437, 360, 10)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert a.train.images.dtype == np.uint8 and a.image_shape == (8, 8, 1) and a.train.images.max() == 255
  counts = np.bincount(a.test.labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified: each digit ~20% of its 174..183 images
  assert a.augment == 'none'


def test_validation_split_is_carved_from_train():
  full = data_lib.load(_data_cfg(name='digits'))
  d = data_lib.load(_data_cfg(name='digits', val_fraction=0.1, val_seed=3))
  assert len(d.train) + len(d.val) == len(full.train) and len(d.val) == 144
  rows = lambda s: {x.tobytes() + bytes([y]) for x, y in zip(s.images, s.labels)}
  assert not rows(d.train) & rows(d.val)
  np.testing.assert_array_equal(d.test.labels, full.test.labels)  # the test set is untouched
  again = data_lib.load(_data_cfg(name='digits', val_fraction=0.1, val_seed=3))
  np.testing.assert_array_equal(again.val.labels, d.val.labels)
  with pytest.raises(errors.ConfigError, match='val_fraction'):
    data_lib.load(_data_cfg(name='digits', val_fraction=1.5))
  with pytest.raises(errors.ConfigError, match="unknown dataset 'cifar1000'"):
    data_lib.load(_data_cfg(name='cifar1000'))


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError) as e:
    data_lib.load(_data_cfg(name='mnist', data_dir=str(tmp_path)))
  msg = str(e.value)
  assert '\n' not in msg and str(tmp_path) in msg and 'tfds build mnist --file_format=array_record' in msg


def test_crop_flip_matches_a_numpy_crop_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (6, 32, 32, 3)).astype(np.uint8)  # no zeros: padding is recognisable
  out = np.asarray(device_data.crop_flip(jax.random.key(1), jnp.asarray(images)))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, pad, got in zip(images, padded, out):
    candidates = [c for y in range(9) for x in range(9) for c in (pad[y:y + 32, x:x + 32],
                                                                    pad[y:y + 32, x:x + 32][:, ::-1])]
    assert any(np.array_equal(got, c) for c in candidates)
  assert not np.array_equal(out, images)  # something moved


def test_eval_padding_counts_each_example_once():
  split = data_lib.Split(np.zeros((7, 2, 2, 1), np.uint8), np.arange(7, dtype=np.int32))
  arrays = device_data.padded_eval_arrays(split, 3)
  assert arrays['images'].shape == (3, 3, 2, 2, 1)
  assert arrays['mask'].sum() == 7
  np.testing.assert_array_equal(arrays['labels'][arrays['mask']], np.arange(7))


def test_cifar100_loop_through_the_real_tfds_path(tmp_path):
  cfg = digits_config('cnn_small', epochs=1, batch_size=16, eval_batch_size=16)
  cfg.data.name = 'cifar100'
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data_lib.load(cfg.data)
    summary = train.run(cfg, str(tmp_path))
  assert ds.num_classes == 100 and ds.image_shape == (32, 32, 3) and ds.augment == 'crop_flip'
  assert ds.mean == pytest.approx((0.5071, 0.4867, 0.4408))
  assert summary.trainer.steps_per_epoch == 3
  assert summary.trainer.evaluate(summary.state)[0]['test_count'] == 48
  # 1 epoch on random mock images learns nothing to check; the reported figures are those of the trained model,
  # recomputed here from its variables and the NumPy-normalised test images.
  one = step_lib.student(jax.device_get(summary.state), 0)
  x = (ds.test.images.astype(np.float32) / 255 - np.asarray(ds.mean, np.float32)) / np.asarray(ds.std, np.float32)
  logits = np.asarray(summary.trainer.parts.student.apply(
      {'params': one.params['student'], **one.state['student']}, jnp.asarray(x), train=False).logits)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert summary['test_accuracy'] == pytest.approx(np.mean(logits.argmax(1) == ds.test.labels), abs=1 / 48 + 1e-9)
  assert summary['test_top5'] == pytest.approx(np.mean((top5 == ds.test.labels[:, None]).any(1)), abs=1 / 48 + 1e-9)


def test_decoded_tfds_arrays_are_cached(tmp_path):
  calls = []
  split = data_lib.Split(np.arange(24, dtype=np.uint8).reshape(3, 2, 2, 2), np.array([0, 1, 2], np.int32))

  def read():
    calls.append(1)
    return split

  path = str(tmp_path / 'kdjax_uint8_train.npz')
  for _ in range(2):
    got = data_lib.cached(path, read, expected_len=3)
    np.testing.assert_array_equal(got.images, split.images)
    np.testing.assert_array_equal(got.labels, split.labels)
  assert len(calls) == 1  # the second load came from the file
  data_lib.cached(path, read, expected_len=4)  # a stale cache (another size) is rebuilt
  assert len(calls) == 2
  data_lib.cached(str(tmp_path / 'missing_dir' / 'x.npz'), read, expected_len=3)  # unwritable: no cache, no error
