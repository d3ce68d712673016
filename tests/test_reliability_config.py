"""Issue 22, config side: every number a run cannot use, a config file that is not Python, bad many-host flags and
joins, a sweep of identical students, and a sweep too large for memory or for unrolling are each refused with one
line naming what is wrong, before anything is written or (for the memory) before the whole program compiles."""

import os
import subprocess
import sys

import pytest

from kdjax import config_lib
from kdjax import distributed
from kdjax import errors
from kdjax import memory as memory_lib
from kdjax import sweep as sweep_lib
from kdjax import train
from kdjax import trainer as trainer_lib
from tests.util import digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with(cfg, path, value):
  *parents, leaf = path.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  with cfg.unlocked():
    node[leaf] = value
  return cfg


def _refused(cfg, tmp_path) -> str:
  """The one line that refuses `cfg`, checked to come before config.json is written."""
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
  return str(e.value)


# ------------------------------------------------------------------------------------ non-finite numbers
NAN, INF = float('nan'), float('1e400')  # '1e400' on the command line parses to inf


def _kd():
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9})
  cfg.teacher.model = 'cnn_small'
  return cfg


NON_FINITE = [
    (lambda: _with(digits_config(), 'optimizer.lr', NAN), 'config.optimizer.lr must be a finite number, got nan'),
    (lambda: _with(digits_config(), 'optimizer.lr', INF), 'config.optimizer.lr must be a finite number, got inf'),
    (lambda: _with(digits_config(), 'optimizer.momentum', NAN), 'config.optimizer.momentum must be a finite'),
    (lambda: _with(digits_config(), 'optimizer.weight_decay', -INF), 'config.optimizer.weight_decay must be a fin'),
    (lambda: _with(digits_config(), 'distill.temperature', 1e39), 'config.distill.temperature must be a finite '
                                                                   'number in float32'),
    (lambda: _with(_kd(), 'distill.losses.kd', NAN), 'config.distill.losses.kd must be a finite number, got nan'),
    (lambda: _with(digits_config(schedule__name='step'), 'schedule.decay_epochs', (1, NAN)),
     'config.schedule.decay_epochs[1] must be a finite number, got nan'),
    (lambda: _with(_kd(), 'distill.mlkd.temperatures', (4.0, INF)), 'config.distill.mlkd.temperatures[1] must be'),
    (lambda: _with(_kd(), 'teacher.recipe', {'optimizer': {'lr': NAN}}),
     'config.teacher.recipe.optimizer.lr must be a finite number, got nan'),
    (lambda: _with(digits_config(), 'sweep', 'optimizer.lr=nan,0.1'),
     'config.sweep.optimizer.lr must be a finite number, got nan'),
    (lambda: _with(digits_config(), 'sweep', 'distill.temperature=2,1e400'),
     'config.sweep.distill.temperature must be a finite number, got inf'),
]


@pytest.mark.parametrize('make, message', NON_FINITE, ids=[m.split(' ')[0] for _, m in NON_FINITE])
def test_non_finite_numbers_are_refused_naming_the_field(make, message, tmp_path):
  assert _refused(make(), tmp_path).startswith(message)


# ---------------------------------------------------------------------------- integers beyond their range
OUT_OF_RANGE = [
    (lambda: digits_config(seed=2**63), 'config.seed must fit a 64-bit integer (|value| < 2**63), got 9223372036'),
    (lambda: digits_config(seed=2**32), 'config.seed must be < 2**32 = 4294967296, got 4294967296 (JAX and NumPy'),
    (lambda: digits_config(seed=2**32 - 2, seeds=3), 'config.seeds=3 from config.seed=4294967294 reaches seed '
                                                     '4294967296, past the largest'),
    (lambda: digits_config(sweep='seed=1,4294967296'), 'config.sweep.seed must be < 2**32'),
    (lambda: digits_config(data__seed=2**40), 'config.data.seed must be < 2**32'),
    (lambda: digits_config(data__seed=-2), 'config.data.seed must be >= -1, got -2'),
    (lambda: digits_config(data__val_seed=2**63 + 1), 'config.data.val_seed must fit a 64-bit integer'),
    (lambda: _with(digits_config(), 'data.folder.seed', 2**33), 'config.data.folder.seed must be < 2**32'),
    (lambda: _with(_kd(), 'teacher.seed', 2**32), 'config.teacher.seed must be < 2**32'),
    (lambda: _with(digits_config(), 'eval_every_epochs', 10**30), 'config.eval_every_epochs must fit a 64-bit'),
]


@pytest.mark.parametrize('make, message', OUT_OF_RANGE, ids=[m.split(' ')[0] for _, m in OUT_OF_RANGE])
def test_integers_beyond_what_jax_and_numpy_read_are_refused_before_config_json(make, message, tmp_path):
  assert _refused(make(), tmp_path).startswith(message)


# ----------------------------------------------------------------------------- a config file that is not Python
NOT_PYTHON = [
    ('optimizer:\n  lr: 0.1\n', 'is not a Python config file: invalid syntax (line 1)'),  # YAML
    ('this is not a config\n', 'is not a Python config file: invalid syntax'),
    ('this is not python\n', "could not be loaded: NameError: name 'this' is not defined"),  # valid syntax
    ('epochs: 3\n', "could not be loaded: AttributeError: module 'config_config' has no attribute 'get_config'"),
    ('\x00\x01binary', 'is not a Python config file: source code string cannot contain null bytes'),
    ('def get_config():\n  return {"epochs": 3}\n', 'get_config() returned dict, not a ml_collections.ConfigDict'),
]


@pytest.mark.parametrize('text, message', NOT_PYTHON, ids=[m.split(':')[0][:30] for _, m in NOT_PYTHON])
def test_a_config_file_that_is_not_python_is_one_line_naming_it(text, message, tmp_path, capsys):
  import launch
  path = tmp_path / 'config.yaml'
  path.write_text(text)
  with pytest.raises(SystemExit) as e:
    launch.parse_flags(['launch.py', f'--config={path}', f'--workdir={tmp_path / "w"}'])
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: config file {path}'), lines
  assert message in lines[0]
  assert not os.path.exists(tmp_path / 'w')


# ----------------------------------------------------------------------------------------------- many hosts
FLAGS = [
    (dict(timeout=float('inf')), '--distributed_timeout must be a number of seconds in (0, 1e+06], got inf'),
    (dict(timeout=float('nan')), '--distributed_timeout must be a number of seconds in (0, 1e+06], got nan'),
    (dict(timeout=1e7), '--distributed_timeout must be a number of seconds in (0, 1e+06], got 10000000.0'),
    (dict(coordinator_address='localhost'), "--coordinator_address='localhost' must be HOST:PORT with a port in "
                                            '1..65535'),
    (dict(coordinator_address='localhost:'), "--coordinator_address='localhost:' must be HOST:PORT"),
    (dict(coordinator_address='localhost:http'), "--coordinator_address='localhost:http' must be HOST:PORT"),
    (dict(coordinator_address='10.0.0.1:70000'), "--coordinator_address='10.0.0.1:70000' must be HOST:PORT"),
    (dict(coordinator_address='::1:1234'), "--coordinator_address='::1:1234': write an IPv6 host in brackets"),
]


@pytest.mark.parametrize('kwargs, message', FLAGS, ids=[m[:40] for _, m in FLAGS])
def test_bad_distributed_flags_are_one_line_before_any_join(kwargs, message):
  args = dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1, timeout=5.0)
  args.update(kwargs)
  with pytest.raises(errors.ConfigError) as e:
    distributed.initialize(**args)
  assert str(e.value).startswith(message), str(e.value)
  assert not distributed.multi()


def _multihost_errors(num_processes, process_ids, tmp_path):
  from tests.test_multihost import Processes, _args, _errors
  with Processes(_args(tmp_path / 'w', tmp_path / 'c'), timeout=30, num_processes=num_processes,
                 process_ids=process_ids) as procs:
    results = procs.wait(timeout=120)
  for rc, text in results:
    assert rc == 2 and 'Traceback' not in text and 'Check failure' not in text, text[-2000:]
  assert not os.path.exists(tmp_path / 'w' / 'config.json')
  return [_errors(text) for _, text in results]


def test_processes_told_different_counts_are_stopped_at_the_join(tmp_path):
  # Process 0 was told 2 and process 1 was told 3: JAX's coordinator waits for process 0's count, so both joined.
  assert _multihost_errors([2, 3], None, tmp_path) == [
      ['error: process 1 was started with --num_processes=3 but process 0 with --num_processes=2; start every '
       'process with the same --num_processes']] * 2


def test_two_processes_with_one_id_are_stopped_at_the_join(tmp_path):
  # Two processes 0: JAX's coordinator ends the first from C++ when the second registers ("a newer incarnation").
  assert _multihost_errors(None, [0, 0], tmp_path) == [
      ['error: two processes were started with --process_id=0; give each process its own --process_id in 0..1']] * 2


# ------------------------------------------------------------------------------------- identical students
IDENTICAL = [
    (dict(sweep='optimizer.lr=0.1,0.1'), 'config.sweep.optimizer.lr: the value 0.1 is given twice'),
    (dict(sweep='optimizer.lr=0.1,0.2,0.10'), 'config.sweep.optimizer.lr: the value 0.1 is given twice'),
    (dict(sweep='seed=3,3'), 'config.sweep.seed: the value 3 is given twice'),
    (dict(sweep='optimizer.lr=0.1,0.1; distill.temperature=4,4', sweep_mode='zip'),
     'config.sweep: students 0 and 1 are the same (optimizer.lr=0.1 distill.temperature=4) and would train '
     'identically'),
    (dict(sweep='optimizer.lr=0.1,0.2,0.1; distill.temperature=4,2,4', sweep_mode='zip', seeds=2),
     'config.sweep: students 0 and 4 are the same (optimizer.lr=0.1 distill.temperature=4 seed=0)'),
]


@pytest.mark.parametrize('overrides, message', IDENTICAL, ids=[m[:40] for _, m in IDENTICAL])
def test_a_sweep_of_identical_students_is_refused_naming_the_value(overrides, message):
  cfg = digits_config()
  for k, v in overrides.items():
    cfg[k] = v
  with pytest.raises(errors.ConfigError) as e:
    sweep_lib.expand(cfg)
  assert str(e.value).startswith(message), str(e.value)


def test_distinct_students_still_sweep():
  # A zip may repeat one axis's value beside another's; an alias maps distinct values to distinct weights.
  cfg = digits_config(sweep='optimizer.lr=0.1,0.1; distill.temperature=1,4', sweep_mode='zip')
  assert sweep_lib.expand(cfg).size == 2
  cfg = _kd()
  config_lib.alpha_losses(cfg, 0.5)
  cfg.sweep = 'alpha=0.1,0.9'
  assert list(sweep_lib.expand(cfg).traced) == ['distill.losses.ce', 'distill.losses.kd']


def test_alias_repeating_a_value_is_refused():
  cfg = _kd()
  config_lib.alpha_losses(cfg, 0.5)
  cfg.sweep = 'alpha=0.1,0.1'
  with pytest.raises(errors.ConfigError, match=r'^config.sweep.alpha: the value 0.1 is given twice'):
    sweep_lib.expand(cfg)


# ---------------------------------------------------------------------------- a sweep too large for memory
def test_more_students_than_the_cpu_unrolls_are_refused_from_the_count_alone():
  # 100,000 students unrolled would trace 100,000 copies of the step: refused before a single config is built.
  with pytest.raises(errors.ConfigError) as e:
    sweep_lib.expand(digits_config(seeds=100000))
  assert str(e.value) == (
      f'config.seeds=100000: 100000 students, but at most {sweep_lib.MAX_UNROLLED_STUDENTS} are unrolled into one '
      "program (students_loop='unroll', the CPU's default: one copy of the step per student, compiled for longer "
      'the more there are); sweep fewer students per run, or set --config.students_loop=vmap (one batched step, '
      'slower per step on the CPU)')
  grid = ','.join(str(0.001 * (i + 1)) for i in range(300))
  with pytest.raises(errors.ConfigError, match=r'^config.sweep: 90000 students, but at most'):
    sweep_lib.expand(digits_config(sweep=f'optimizer.lr={grid}; optimizer.momentum={grid.replace("0.", "0.0")}'))
  vmapped = digits_config(seeds=sweep_lib.MAX_UNROLLED_STUDENTS + 1, students_loop='vmap')
  assert sweep_lib.expand(vmapped).size == sweep_lib.MAX_UNROLLED_STUDENTS + 1


@pytest.fixture
def compiled(monkeypatch):
  """The student counts of every train program compiled, and a 'device' of the given memory."""
  sizes = []
  original = trainer_lib.Trainer.compile

  def compile_(self, ts):
    sizes.append(self.num_students)
    assert self.num_students <= 2, f'the whole program of {self.num_students} students was compiled'
    return original(self, ts)

  monkeypatch.setattr(trainer_lib.Trainer, 'compile', compile_)
  return sizes


def test_an_unrolled_sweep_too_large_for_memory_is_refused_before_its_program_compiles(compiled, monkeypatch,
                                                                                       tmp_path):
  # 40 digits students: a 0.46 MiB state each, about 2.5 MiB of temporaries each. The 64 MiB 'device' holds the
  # states (18 MiB); the estimate from the 1- and 2-student programs (0.11 GiB) does not fit, and the 40-student
  # program (which `compiled` would refuse to compile) is never compiled.
  monkeypatch.setattr(memory_lib, 'available', lambda n, budget=0.0: 64 << 20)
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(digits_config(seeds=40, epochs=1), str(tmp_path))
  assert compiled == [1, 2]
  assert str(e.value).startswith('the sweep of 40 students needs about 0.1')
  assert ('estimated from the programs of 1 and 2 students per device, before compiling the whole sweep) but '
          '0.06 GiB are available') in str(e.value)
  assert not os.path.exists(tmp_path / 'checkpoints' / '0')


def test_a_sweep_whose_state_alone_does_not_fit_compiles_nothing(compiled, monkeypatch, tmp_path):
  monkeypatch.setattr(memory_lib, 'available', lambda n, budget=0.0: 16 << 20)
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(digits_config(seeds=100, students_loop='vmap', epochs=1), str(tmp_path))
  assert compiled == []
  assert str(e.value).startswith('the sweep of 100 students needs about 0.05 GiB per device (train state 0.05 GiB, '
                                 'XLA temporaries 0.00 GiB; estimated from its train state alone, before compiling '
                                 'anything) but 0.02 GiB are available')


def test_a_small_run_compiles_no_extra_program(monkeypatch):
  from kdjax import data as data_lib
  from kdjax import memory
  sizes = []
  monkeypatch.setattr(trainer_lib.Trainer, 'compile', lambda self, ts: sizes.append(self.num_students))
  for cfg in (digits_config(seeds=memory.PRE_ESTIMATE_STUDENTS), digits_config(seeds=40, students_loop='vmap')):
    sweep = sweep_lib.expand(cfg)
    monkeypatch.setattr(memory, 'available', lambda n, budget=0.0: 64 << 30)
    exp = trainer_lib.build(cfg, data_lib.load(sweep.base.data), sweep=sweep)
    assert memory.estimate_before_compile(exp, exp.init_state(abstract=True)) is None
  assert sizes == []


def test_launch_refuses_a_huge_sweep_and_a_non_finite_override_in_one_line(tmp_path):
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  env.pop('XLA_FLAGS', None)
  for override, line in (('--config.seeds=100000', 'error: config.seeds=100000: 100000 students, but at most'),
                         ('--config.optimizer.lr=1e400', 'error: config.optimizer.lr must be a finite number, got '
                                                         'inf')):
    r = subprocess.run([sys.executable, 'launch.py', '--config=configs/teacher.py:mlp,digits',
                        f'--workdir={tmp_path}', override], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors_out = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(errors_out) == 1 and errors_out[0].startswith(line) and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'config.json')
