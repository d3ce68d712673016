"""A table too large for the memory budget (`config.memory_budget_gb`) is split into the fewest programs that fit,
run one after another: the split said in one line, every student as in the unsplit table, a run stopped in the
second program resumed there (the first not trained again), the records and results of every group gathered; a
group that alone does not fit refused in one line, nothing written."""

import csv
import json
import logging
import os

from absl import logging as absl_logging
import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import errors
from kdjax import memory
from kdjax import table_split
from kdjax import train
from kdjax import trainer as trainer_lib
from tests.test_table import _assert_close, _assert_close_norm, _config, _host
from tests.util import random_teacher

SWEEP = 'method=kd,crd'
GROUPS = ['method=kd', 'method=crd']


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return random_teacher(str(tmp_path_factory.mktemp('split_teacher')), 'resnet8')


@pytest.fixture(scope='module')
def unsplit(teacher_dir, tmp_path_factory):
  return train.run(_config(teacher_dir, SWEEP), str(tmp_path_factory.mktemp('unsplit') / 'run'))


@pytest.fixture(scope='module')
def budget_gb(unsplit):
  """A budget that each group alone fits and the two together do not: from `table_split.plan`'s estimates of
  each group alone (XLA's analysis of its program), with room for the larger one by a thousandth."""
  t = unsplit.trainer
  build = lambda sub, mesh: trainer_lib.build(t.cfg, t.ds, mesh, t.teacher, t.teacher_vars, sub)
  estimates = table_split.plan(t, build)
  own = estimates['groups']
  assert sorted(own) == sorted(GROUPS) and min(own.values()) > 0
  return (estimates['shared'] + max(own.values())) * 1.001 / memory.MEMORY_FRACTION / 2**30


def _split_config(teacher_dir, budget_gb):
  cfg = _config(teacher_dir, SWEEP)
  cfg.memory_budget_gb = budget_gb
  return cfg


@pytest.fixture(scope='module')
def split(teacher_dir, budget_gb, tmp_path_factory):
  work = str(tmp_path_factory.mktemp('split') / 'run')
  handler, verbosity = _Lines(), absl_logging.get_verbosity()
  logging.getLogger('absl').addHandler(handler)
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    out = train.run(_split_config(teacher_dir, budget_gb), work)
  finally:
    absl_logging.set_verbosity(verbosity)
    logging.getLogger('absl').removeHandler(handler)
  return work, out, handler.lines


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_a_table_too_large_is_split_and_trains_as_unsplit(split, unsplit):
  work, out, lines = split
  assert 'table split into 2 programs to fit memory: [method=kd] [method=crd]' in lines
  assert [p['groups'] for p in out['programs']] == [[GROUPS[0]], [GROUPS[1]]]
  assert [p['students'] for p in out['programs']] == [[0], [1]]
  assert json.load(open(os.path.join(work, table_split.PLAN_FILE)))['programs'][1]['groups'] == [GROUPS[1]]
  ours, theirs = _host([out.student_state(i) for i in (0, 1)]), _host([unsplit.student_state(i) for i in (0, 1)])
  for mine, one in zip(ours, theirs):
    _assert_close(mine.params, one.params)
    _assert_close(mine.state, one.state)  # BatchNorm statistics, CRD's memory banks
    _assert_close_norm(mine.opt_state, one.opt_state)
  for s, u in zip(out['students'], unsplit['students']):
    assert (s['index'], s['name']) == (u['index'], u['name'])
    assert s['test_accuracy'] == pytest.approx(u['test_accuracy'], abs=1 / 360 + 1e-9)


def test_a_split_table_gathers_records_and_results(split):
  work, out, _ = split
  epochs = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  assert sorted((r['student'], r['epoch']) for r in epochs) == [(0, 1), (0, 2), (1, 1), (1, 2)]
  assert 'loss_crd' in next(r for r in epochs if r['student'] == 1)
  rows = list(csv.DictReader(open(os.path.join(work, 'results.csv'))))
  assert [r['method'] for r in rows] == ['kd', 'crd']
  for row, s in zip(rows, out['students']):
    assert float(row['last_test_accuracy']) == pytest.approx(s['test_accuracy'])
  table = open(os.path.join(work, 'table.md')).read()
  assert '| kd ' in table and '| crd ' in table


@pytest.mark.slow
def test_a_split_table_stopped_in_its_second_program_resumes_there(split, teacher_dir, budget_gb, tmp_path,
                                                                    monkeypatch):
  _, reference, _ = split
  work = str(tmp_path / 'work')
  original = trainer_lib.Trainer.train_chunk
  calls = {'n': 0}

  def counted(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == 13 and calls.get('kill'):  # 10 steps a program, one a dispatch: the second's third step
      os.kill(os.getpid(), 15)
    return original(self, ts, epoch, start)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', counted)
  calls['kill'] = True
  with pytest.raises(errors.Preempted):
    train.run(_split_config(teacher_dir, budget_gb), work)
  assert ckpt_lib.read_meta(table_split.program_dir(work, 0))['complete']
  meta = ckpt_lib.read_meta(table_split.program_dir(work, 1))
  assert not meta['complete'] and meta['step'] == 3
  calls.update(n=0, kill=False)
  # The budget no longer matters: the saved plan is resumed (a larger one would not merge the programs).
  resumed = train.run(_split_config(teacher_dir, 0.0), work)
  assert calls['n'] == 7  # the second program's last 7 steps; the first is restored, not trained again
  for i in (0, 1):
    jax.tree.map(np.testing.assert_array_equal, _host(resumed.student_state(i)), _host(reference.student_state(i)))
  epochs = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  assert sorted((r['student'], r['epoch']) for r in epochs) == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_groups_are_packed_first_fit_decreasing():
  # Largest first (ties by index), each into the first program with room, for a room of 10: 7+3 | 5+4+1 | 4+2+1
  # (3 programs, the fewest: the sizes add up to 27).
  sizes = {0: 4, 1: 7, 2: 1, 3: 5, 4: 3, 5: 4, 6: 2, 7: 1}
  assert table_split.pack(sizes, 10) == [[0, 2, 3], [1, 4], [5, 6, 7]]
  assert table_split.pack({0: 3, 1: 3}, 10) == [[0, 1]]
  assert table_split.pack({0: 6, 1: 6}, 10) == [[0], [1]]


def test_a_group_too_large_alone_is_refused_in_one_line(teacher_dir, tmp_path):
  cfg = _config(teacher_dir, SWEEP)
  cfg.memory_budget_gb = 1e-4  # 105 kB: not even a resnet8's train state
  work = tmp_path / 'refused'
  with pytest.raises(errors.ConfigError, match=r'^config.sweep: the group method=kd alone needs about '
                     r'[0-9.]+ GiB per device \(.*\) but 0.00 GiB are available \(config.memory_budget_gb = '
                     r'0.0001\): the table does not fit even split into programs') as e:
    train.run(cfg, str(work))
  assert '\n' not in str(e.value)
  assert not work.exists()


@pytest.mark.parametrize('text, why', [
    ('{"programs": [{"groups": ["method=kd"], "stud', 'Unterminated string'),
    ('{"programs": []}', 'not a plan of programs'),
    ('{"programs": [{"groups": "method=kd", "students": [0]}]}', 'not a plan of programs'),
    ('\xff\xfe', 'Expecting value'),
])
def test_a_damaged_plan_is_refused_in_one_line(tmp_path, text, why):
  path = tmp_path / table_split.PLAN_FILE
  path.write_text(text)
  with pytest.raises(errors.ConfigError) as e:
    table_split.load(str(tmp_path))
  message = str(e.value)
  assert message.startswith(f'{path} is damaged (') and why in message and '\n' not in message, message
  assert message.endswith('the split table cannot resume from it; restore it, or start the table again in a new '
                          'workdir')
