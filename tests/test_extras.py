"""`config.distill.extras_checkpoint` (kdjax/extras_init.py) and the importer of the reference's extra modules
(kdjax/tools/torch_extras.py, `import_torch --extras`)."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import errors
from kdjax import extras_init
from kdjax import step as step_lib
from kdjax import train
from kdjax.methods import crd as crd_lib
from kdjax.methods import feature
from tests.util import digits_config, random_teacher

torch = pytest.importorskip('torch')
from kdjax.tools import import_torch, torch_extras, torch_reference  # noqa: E402


def _crd_config(tmp_path, **crd):
  cfg = digits_config('mlp', {'ce': 1.0, 'crd': 0.8}, epochs=1, teacher__model='cnn_small')
  cfg.teacher.checkpoint = str(tmp_path / 'teacher')
  cfg.distill.crd.update(nce_k=100, **crd)
  return cfg


@pytest.fixture(scope='module')
def crd_run(tmp_path_factory):
  """A finished 1-epoch CRD run (mlp student, random cnn_small teacher): its workdir and final state."""
  tmp = tmp_path_factory.mktemp('extras')
  random_teacher(str(tmp / 'teacher'), 'cnn_small')
  summary = train.run(_crd_config(tmp), str(tmp / 'first'))
  return tmp, str(tmp / 'first'), jax.device_get(step_lib.student(summary.state, 0))


@pytest.mark.slow
def test_a_fresh_run_starts_from_a_runs_extras_with_a_fresh_optimizer(crd_run, monkeypatch):
  tmp, first, done = crd_run
  started = []
  original = extras_init.init_from_checkpoint

  def spy(*args):  # the state the run starts from, copied before its first step donates it
    ts = original(*args)
    started.append(jax.device_get(step_lib.student(ts, 0)))
    return ts

  monkeypatch.setattr(extras_init, 'init_from_checkpoint', spy)
  cfg = _crd_config(tmp)
  cfg.distill.extras_checkpoint = first
  train.run(cfg, str(tmp / 'second'))
  start = started[0]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(done.params['extras']),
               jax.device_get(start.params['extras']))
  # The memory banks and their normalisers too (the non-trained collection).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(done.state['extras']),
               jax.device_get(start.state['extras']))
  assert float(done.state['extras']['memory']['crd']['z_s']) != -1.0  # a trained bank, not an initial one
  # SGD with momentum: a fresh state is all zeros (the finished run's momentum is not).
  assert all(not np.any(a) for a in jax.tree.leaves(jax.device_get(start.opt_state)))
  assert any(np.any(a) for a in jax.tree.leaves(jax.device_get(done.opt_state)))


@pytest.mark.slow
def test_extras_of_another_shape_or_none_are_refused_before_anything_is_written(crd_run):
  tmp, first, _ = crd_run
  cfg = _crd_config(tmp, feat_dim=64)
  cfg.distill.extras_checkpoint = first
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r'params/extras/crd/embed_s/bias has shape \(128,\) there, this run builds \(64,\)') as e:
    train.run(cfg, str(tmp / 'reshaped'))
  assert '\n' not in str(e.value)
  cfg = _crd_config(tmp)
  cfg.distill.extras_checkpoint = str(tmp / 'teacher')  # a model checkpoint: no extras
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"holds no extra module of this run's methods \(crd\); it holds none"):
    train.run(cfg, str(tmp / 'none'))
  cfg = _crd_config(tmp)
  cfg.sweep = 'method=kd,crd'  # a program of two groups
  cfg.distill.extras_checkpoint = first
  with pytest.raises(errors.ConfigError, match='method=kd: distill.extras_checkpoint starts every student'):
    train.run(cfg, str(tmp / 'table'))
  for name in ('reshaped', 'none', 'table'):
    assert not os.path.isdir(tmp / name / 'checkpoints')


def _randomised(module: torch.nn.Module, seed: int):
  """`module` in eval mode with random weights and BatchNorm statistics (not the initial ones)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if t.is_floating_point() and not name.startswith('contrast.'):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith('var') else
                torch.randn(t.shape, generator=g) * 0.5)
  return module.eval()


@pytest.mark.parametrize('s_hw,t_hw', [(8, 4), (4, 8), (6, 4)])  # stride-2 conv, transposed conv, VALID conv
def test_imported_fitnet_regressor_equals_repdistillers(s_hw, t_hw, tmp_path):
  ref = _randomised(torch_reference.ConvReg((2, 3, s_hw, s_hw), (2, 5, t_hw, t_hw)), seed=s_hw + t_hw)
  x = np.random.RandomState(0).randn(2, s_hw, s_hw, 3).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  torch.save(ref.state_dict(), tmp_path / 'regressor.pth')
  assert import_torch.main(['--extras', 'fitnet', str(tmp_path / 'regressor.pth'), str(tmp_path / 'out')]) == 0
  # Read back as a run reads it: FitNet's module, its parameters and BatchNorm statistics (state['extras']).
  module = feature.FitNet(0, (t_hw, t_hw), 5)
  student = types.SimpleNamespace(features=[jnp.asarray(x)])
  call = dict(labels=None, indices=None, teacher_classify=None)
  init = jax.eval_shape(lambda: module.init(jax.random.key(0), student, None, train=False, **call))
  params, state = extras_init.restore(str(tmp_path / 'out'), {'fitnet': init['params']},
                                      {'batch_stats': {'fitnet': init['batch_stats']}})
  got = module.apply({'params': params['fitnet'], 'batch_stats': state['batch_stats']['fitnet']}, student, None,
                     train=False, **call)['hint']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_imported_crd_embeddings_equal_repdistillers_through_the_file(tmp_path):
  ref = _randomised(torch_reference.CRDHeads(12, 20, 16, n_data=30), seed=1)
  rng = np.random.RandomState(0)
  f_s, f_t = rng.randn(4, 12).astype(np.float32), rng.randn(4, 2, 2, 5).astype(np.float32)
  with torch.no_grad():
    want_s, want_t = (a.numpy() for a in ref(torch.from_numpy(f_s), torch.from_numpy(f_t)))
  torch.save({'model': ref.state_dict()}, tmp_path / 'crd.pth')
  assert import_torch.main(['--extras', 'crd', str(tmp_path / 'crd.pth'), str(tmp_path / 'out')]) == 0
  module = crd_lib.CRD(12, 20, num_data=30, feat_dim=16, nce_k=8)
  s, t = types.SimpleNamespace(embedding=jnp.asarray(f_s)), types.SimpleNamespace(embedding=jnp.asarray(f_t))
  init = jax.eval_shape(lambda: module.init({'params': jax.random.key(0), 'memory': jax.random.key(1)}, s, t,
                                            labels=None, indices=None, train=False, teacher_classify=None))
  params, state = extras_init.restore(str(tmp_path / 'out'), {'crd': init['params']},
                                      {'memory': {'crd': init['memory']}})
  assert state == {}  # the file holds no memory banks: the run keeps its own
  memory = module.init({'params': jax.random.key(0), 'memory': jax.random.key(1)}, s, t, labels=None, indices=None,
                       train=False, teacher_classify=None)['memory']
  got = module.apply({'params': params['crd'], 'memory': memory}, s, t, labels=None, indices=None, train=False,
                     teacher_classify=None)
  np.testing.assert_allclose(got['embed_s'], want_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['embed_t'], want_t, rtol=1e-5, atol=1e-6)
  with pytest.raises(errors.CheckpointMismatchError, match=r"state_dict key 'embed_x.linear.weight' is of no crd"):
    torch_extras.convert({'embed_x.linear.weight': np.zeros((2, 2))}, 'crd')


@pytest.mark.slow
def test_api_save_carries_the_extras(crd_run):
  """`api.save`'s model checkpoint holds the student and its extras: a run's teacher and its extras checkpoint."""
  from kdjax import api, data
  from kdjax import checkpoint as ckpt_lib
  tmp, _, _ = crd_run
  cfg = _crd_config(tmp)
  ds = data.load(cfg.data)
  program = api.init(cfg, ds)
  api.save(str(tmp / 'saved'), program, program.state)
  one = jax.device_get(step_lib.student(program.state, 0))
  shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  params, state = extras_init.restore(str(tmp / 'saved'), shapes(one.params['extras']), shapes(one.state['extras']))
  jax.tree.map(np.testing.assert_array_equal, one.params['extras'], jax.device_get(params))
  jax.tree.map(np.testing.assert_array_equal, one.state['extras'], jax.device_get(state))
  student, _ = ckpt_lib.load_model(str(tmp / 'saved'), shapes(program.variables(program.state)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(program.variables(program.state)),
               jax.device_get(student))
