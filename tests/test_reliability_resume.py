"""Nothing of a finished run is lost on a resume: a checkpoint that does not fit the config is refused (not set aside
as damaged), a workdir with checkpoints but no config.json is refused, and the records rewritten whole are written
atomically. A damaged step is still skipped and set aside."""

import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from kdjax import atomic
from kdjax import errors
from kdjax import results
from kdjax import sweep as sweep_lib
from kdjax import train
from tests.util import digits_config


def _folder(root, classes, per_class=6, size=(8, 8)):
  """torchvision's ImageFolder layout, train/ and test/: 8x8 RGB PNGs."""
  rng = np.random.default_rng(len(classes))
  for split, n in (('train', per_class), ('test', 2)):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n):
        image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(root, split, c, f'{i}.png'))
  return str(root)


def _cfg(data_dir, cache, epochs=2):
  c = digits_config('mlp', epochs=epochs, batch_size=4, eval_batch_size=4, figures=False)
  c.data.update(name='folder', dir=data_dir, cache_dir=cache)
  return c


def _digest(workdir):
  """Every file of the workdir (the lock too: in this process it holds the same pid) by its content hash."""
  digests = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      with open(os.path.join(d, f), 'rb') as data:
        digests[os.path.relpath(os.path.join(d, f), workdir)] = hashlib.sha1(data.read()).hexdigest()
  return digests


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 2-epoch run on a 2-class folder; tests resume copies of it. Also a 3-class folder."""
  root = tmp_path_factory.mktemp('resume')
  two, three = _folder(root / 'two', ('a', 'b')), _folder(root / 'three', ('a', 'b', 'c'))
  cache = str(root / 'cache')
  work = str(root / 'run')
  train.train_and_evaluate(_cfg(two, cache), work)
  return {'work': work, 'two': two, 'three': three, 'cache': cache}


def _steps(work):
  return sorted(n for n in os.listdir(os.path.join(work, 'checkpoints')) if n.isdigit())


def _copy(finished, tmp_path):
  work = str(tmp_path / 'run')
  shutil.copytree(finished['work'], work)
  return work


def test_a_resume_whose_data_changes_a_shape_is_refused_and_nothing_moves(finished, tmp_path):
  work = _copy(finished, tmp_path)
  before = _digest(work)
  # data.dir may change on a resume (the same files elsewhere); here it points at a folder with 3 classes.
  with pytest.raises(errors.CheckpointMismatchError) as e:
    train.train_and_evaluate(_cfg(finished['three'], finished['cache']), work)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'checkpoint step 6 in {work}/checkpoints does not fit this config: '
                            'params/student/head/bias is saved with shape (1, 2), this config builds (1, 3) (and 3 '
                            'more); the run was trained on 2 classes of 8x8x3 images, the data read now '
                            '(data.dir, data.data_dir) has 3 classes of 8x8x3 images; the run is kept as it '
                            'is'), message
  assert '--restart' in message
  assert _digest(work) == before  # no file rewritten, none moved aside as damaged
  assert not [n for n in os.listdir(os.path.join(work, 'checkpoints')) if n.startswith('damaged-')]
  # The same data elsewhere resumes (the run is complete: nothing trains, the records are written again).
  moved = shutil.copytree(finished['two'], str(tmp_path / 'moved'))
  train.train_and_evaluate(_cfg(moved, finished['cache']), work)
  assert json.load(open(os.path.join(work, 'config.json')))['data']['dir'] == moved
  assert [json.loads(l)['epoch'] for l in open(os.path.join(work, 'metrics.jsonl')) if '"epoch"' in l] == [1, 2]
  assert _steps(work) == ['3', '6']


def test_checkpoints_without_config_json_are_refused_and_restart_still_works(finished, tmp_path):
  work = _copy(finished, tmp_path)
  os.remove(os.path.join(work, 'config.json'))
  before = _digest(work)
  cfg = _cfg(finished['two'], finished['cache'])
  with pytest.raises(errors.ConfigError, match=rf'^{re.escape(work)} holds checkpoints but no config.json, so this '
                                               r'config cannot be checked against the run that wrote them; .* or pass '
                                               '--restart'):
    train.train_and_evaluate(cfg, work)
  assert _digest(work) == before
  # --restart sets the run aside (its checkpoints with it) and starts anew.
  train.train_and_evaluate(cfg, work, restart=True)
  (aside,) = [n for n in os.listdir(work) if n.startswith('previous-')]
  assert sorted(os.listdir(os.path.join(work, aside, 'checkpoints'))) == ['3', '6']
  assert os.path.isfile(os.path.join(work, 'config.json'))
  # A config.json that is not JSON is refused in one line too, naming the file.
  with open(os.path.join(work, 'config.json'), 'w') as f:
    f.write('{"epochs": 2,')
  with pytest.raises(errors.ConfigError, match=rf'^{re.escape(work)}/config.json cannot be read \(Expecting'):
    train.train_and_evaluate(cfg, work)


def _half_json_dump(obj, f, **kw):
  f.write(json.dumps(obj, **kw)[:10])  # a crash after part of the file was written
  raise OSError(28, 'No space left on device')


class _HalfWriter(csv.DictWriter):
  def writerows(self, rows):  # after the header: a crash after part of the file was written
    raise OSError(28, 'No space left on device')


def _crash_config(monkeypatch, cfg, work):
  monkeypatch.setattr(type(cfg), 'to_json_best_effort', lambda self, **kw: 1 / 0)
  train.write_config(cfg, work)


def _crash_sweep(monkeypatch, cfg, work):
  monkeypatch.setattr(json, 'dump', _half_json_dump)
  train.write_config(cfg, work, sweep_lib.expand(cfg))


def _crash_csv(monkeypatch, cfg, work):
  run = results.load_run(work)
  monkeypatch.setattr(csv, 'DictWriter', _HalfWriter)
  results.write_csv(run)


@pytest.mark.parametrize('name,crash', [('config.json', _crash_config), ('sweep.json', _crash_sweep),
                                        ('results.csv', _crash_csv)])
def test_a_crash_while_a_record_is_rewritten_leaves_the_previous_one(finished, tmp_path, monkeypatch, name, crash):
  work = _copy(finished, tmp_path)
  before = _digest(work)
  with pytest.raises((OSError, ZeroDivisionError)):
    crash(monkeypatch, _cfg(finished['two'], finished['cache']), work)
  monkeypatch.undo()
  assert _digest(work) == before  # the old file whole, and no temporary file left beside it
  if name == 'config.json':  # the run still resumes
    train.train_and_evaluate(_cfg(finished['two'], finished['cache']), work)
    assert _steps(work) == ['3', '6'] and not [n for n in os.listdir(work) if n.startswith('previous-')]


def test_the_atomic_writer_keeps_permissions_and_replaces_whole(tmp_path):
  plain = tmp_path / 'plain'
  plain.write_text('x')
  path = tmp_path / 'record.json'
  with atomic.writing(str(path)) as f:
    f.write('{"a": 1}')
  assert json.load(open(path)) == {'a': 1} and sorted(os.listdir(tmp_path)) == ['plain', 'record.json']
  assert os.stat(path).st_mode == os.stat(plain).st_mode  # the umask's permissions, as open() gives (not 0600)
  with pytest.raises(RuntimeError):
    with atomic.writing(str(path)) as f:
      f.write('{"a": 2, "b"')
      raise RuntimeError('killed')
  assert json.load(open(path)) == {'a': 1} and sorted(os.listdir(tmp_path)) == ['plain', 'record.json']


def test_a_damaged_step_is_still_set_aside_and_the_run_resumes_from_the_one_before(finished, tmp_path, caplog):
  work = _copy(finished, tmp_path)
  # The step's tree metadata (what the fit check reads) cut short, as by a crash mid-save: damage, not a misfit.
  metadata = os.path.join(work, 'checkpoints', '6', 'state', '_METADATA')
  with open(metadata, 'r+b') as f:
    f.truncate(os.path.getsize(metadata) // 2)
  caplog.set_level('WARNING')
  train.train_and_evaluate(_cfg(finished['two'], finished['cache']), work)
  assert any('checkpoint step 6' in r.getMessage() and 'is damaged' in r.getMessage() for r in caplog.records)
  assert [n for n in os.listdir(os.path.join(work, 'checkpoints')) if n.startswith('damaged-6-')]
  assert _steps(work) == ['3', '6']  # epoch 2 trained again from step 3
  assert [json.loads(l)['epoch'] for l in open(os.path.join(work, 'metrics.jsonl')) if '"epoch"' in l] == [1, 2]


def test_a_cached_teacher_that_does_not_fit_is_refused_not_set_aside(tmp_path):
  data = _folder(tmp_path / 'data', ('a', 'b'))
  cfg = _cfg(data, str(tmp_path / 'cache'), epochs=1)
  cfg.distill.losses = {'ce': 0.1, 'kd': 0.9}
  cfg.teacher.update(model='mlp', kwargs={'hidden': (16,)}, cache_dir=str(tmp_path / 'teachers'), recipe={'epochs': 1})
  train.train_and_evaluate(cfg, str(tmp_path / 'a'))
  (cached,) = os.listdir(tmp_path / 'teachers')
  before = _digest(str(tmp_path / 'teachers'))
  _folder(tmp_path / 'data', ('c',))  # the folder changed in place: the same cache key, now 3 classes
  with pytest.raises(errors.CheckpointMismatchError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / 'b'))
  message = str(e.value)
  assert '\n' not in message
  assert 'has 2 classes, but the dataset and config need 3: it is the cached teacher of this recipe, kept as it is ' \
         '(not damaged)' in message, message
  assert os.listdir(tmp_path / 'teachers') == [cached] and _digest(str(tmp_path / 'teachers')) == before
