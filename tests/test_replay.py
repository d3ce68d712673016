"""The teacher replay store (kdjax/replay.py, kdjax/tools/teacher_logits.py): students trained from a store of every
logit equal students trained with the live teacher on the same augmented views; top-k stores reconstruct as
specified; every store that does not fit the run is refused in one line before anything is written."""

import os

import jax
import numpy as np
import pytest

from kdjax import replay
from kdjax import train
from kdjax.errors import ConfigError
from kdjax.tools import teacher_logits
from tests.util import digits_config, random_teacher

# float32 round-off: the teacher's forward pass compiled into the step vs into the store's program.
RTOL, ATOL = 2e-5, 2e-6


def _config(teacher_dir, store='', **overrides):
  """A conv/BN student (cnn_small) distilled by KD on augmented digits: 4 steps per epoch."""
  fields = dict(epochs=2, data__augment='crop_flip', data__train_examples=256, steps_per_dispatch=1,
                teacher__model='cnn_small', teacher__checkpoint=teacher_dir, distill__teacher_store=store)
  cfg = digits_config('cnn_small', {'ce': 0.5, 'kd': 0.5}, **dict(fields, **overrides))
  cfg.figures = False
  return cfg


@pytest.fixture(scope='module')
def made(tmp_path_factory):
  """(teacher dir, a store of every logit for 2 epochs)."""
  tmp = tmp_path_factory.mktemp('replay')
  teacher = random_teacher(str(tmp / 'teacher'), 'cnn_small')
  store = str(tmp / 'store')
  lines = []
  meta = teacher_logits.run(_config(teacher, store), str(tmp / 'tool'), log=lines.append)
  assert meta['shape'] == [8, 64, 10] and meta['epochs'] == 2
  assert meta['bytes_per_example'] == 10 * 4 + 10 * 2 + 4  # float32 values, int16 classes, one float32 rest
  assert sum(l.startswith('teacher_logits: epoch') for l in lines) == 2, lines
  return teacher, store


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_students_from_a_full_store_equal_students_with_the_live_teacher(made, tmp_path):
  teacher, store = made
  replayed = train.run(_config(teacher, store), str(tmp_path / 'replayed'))
  assert isinstance(replayed.trainer.parts.table, replay.StoreLayout) and int(replayed.state.step) == 8
  live = train.run(_config(teacher), str(tmp_path / 'live'))
  assert live.trainer.store is None and live.trainer.teacher_table is None  # augmented: the teacher ran every step
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
               _host((replayed.state.params, replayed.state.state)), _host((live.state.params, live.state.state)))
  # Streamed (distill.store_stream): each dispatch's rows sent from the files; 3 steps a dispatch, so the epoch's
  # 4th step is a dispatch of its own and the last one's rows run past the store's end (zeros, never read).
  streamed = train.run(_config(teacher, store, distill__store_stream='on', steps_per_dispatch=3),
                       str(tmp_path / 'streamed'))
  assert streamed.trainer.parts.table.rows == 3 and streamed.trainer.teacher_table['values'].shape[0] == 3
  assert not replay.streams(_config(teacher, store), {'values': np.zeros(4)})  # auto: a small store is placed whole
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
               _host((streamed.state.params, streamed.state.state)), _host((live.state.params, live.state.state)))
  # The step reads the store: the same store with other logits (its checksums rewritten) trains another student.
  meta = replay.read_meta(store)
  arrays = {n: np.load(os.path.join(store, f'{n}.npy')) for n in replay.FILES}
  other = str(tmp_path / 'other_store')
  replay.write(other, meta['key'], dict(arrays, values=arrays['values'] * 3), meta['steps_per_epoch'])
  changed = train.run(_config(teacher, other), str(tmp_path / 'changed'))
  assert not np.allclose(_host(changed.state.params['student'])['head']['kernel'],
                         _host(live.state.params['student'])['head']['kernel'], rtol=1e-3, atol=1e-4)


def test_a_run_makes_its_missing_store_first(made, tmp_path):
  teacher, store = made
  path = tmp_path / 'new_store'
  outcome = train.run(_config(teacher, str(path), epochs=1), str(tmp_path / 'run'))
  assert isinstance(outcome.trainer.parts.table, replay.StoreLayout)
  assert replay.read_meta(str(path))['epochs'] == 1
  for name in replay.FILES:  # the tool's store's first epoch
    np.testing.assert_array_equal(np.load(path / f'{name}.npy'), np.load(os.path.join(store, f'{name}.npy'))[:4])


def test_top_k_reconstructs_exactly_and_shares_the_rest_mass():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(16, 10)) * 3).astype(np.float32)
  k = 3
  dense = np.asarray(replay.expand(*replay.compress(logits, k), 10))
  for row, got in zip(logits, dense):
    top = np.argsort(-row)[:k]
    others = np.setdiff1d(np.arange(10), top)
    np.testing.assert_array_equal(got[top], row[top])  # the top k exact
    share = np.log(np.sum(np.exp(row[others].astype(np.float64))) / (10 - k))
    np.testing.assert_allclose(got[others], share, rtol=1e-5)  # the rest: equal shares of their exp-mass
    # The softmax keeps each top-k probability and the rest's total.
    p, q = np.exp(row - row.max()), np.exp(got - got.max())
    p, q = p / p.sum(), q / q.sum()
    np.testing.assert_allclose(q[top], p[top], rtol=1e-5)
    np.testing.assert_allclose(q[others].sum(), p[others].sum(), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(replay.expand(*replay.compress(logits, 10), 10)), logits)  # k = C


@pytest.mark.parametrize('overrides, message', [
    ({'data__augment': 'none'}, 'data.augment'),
    ({'data__train_examples': 320}, r'training set \(sha256\)'),
    ({'batch_size': 32}, 'batch_size'),
    ({'seed': 1}, 'data seed'),
    ({'distill__store_topk': 5}, 'distill.store_topk'),
    ({'epochs': 3}, r'covers 2 epoch\(s\)'),
    ({'distill__losses': {'ce': 1.0, 'at': 100.0}}, "at reads the teacher's features"),
    ({'distill__losses': {'ce': 1.0, 'mlkd': 1.0}}, 'mlkd reads the teacher on the extra view'),
    ({'teachers': [{'model': 'cnn_small', 'checkpoint': 'TEACHER'}]}, 'config.teachers adds 1 more'),
])
def test_a_store_that_does_not_fit_the_run_is_refused(made, tmp_path, overrides, message):
  teacher, store = made
  if 'teachers' in overrides:  # the same checkpoint as a second teacher
    overrides = dict(overrides, teachers=[dict(overrides['teachers'][0], checkpoint=teacher)])
  work = tmp_path / 'work'
  with pytest.raises(ConfigError, match=message) as e:
    train.run(_config(teacher, store, **overrides), str(work))
  assert '\n' not in str(e.value) and 'teacher_store' in str(e.value)
  assert not work.exists()  # refused before anything was written


def test_another_teacher_or_a_damaged_store_is_refused(made, tmp_path):
  teacher, store = made
  other = random_teacher(str(tmp_path / 'other'), 'cnn_small', seed=1)
  with pytest.raises(ConfigError, match=r'teacher variables \(sha256\)'):
    train.run(_config(other, store), str(tmp_path / 'a'))
  damaged = tmp_path / 'damaged'
  os.makedirs(damaged)
  for name in os.listdir(store):
    data = open(os.path.join(store, name), 'rb').read()
    open(damaged / name, 'wb').write(data[:-100] if name == 'values.npy' else data)
  with pytest.raises(ConfigError, match=r'values.npy is missing or does not match its sha256'):
    train.run(_config(teacher, str(damaged)), str(tmp_path / 'b'))
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
