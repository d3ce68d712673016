"""kdjax.tools.import_keras: Keras' ResNet50V2 and MobileNetV2 weight files give Keras' own logits.

The Keras models are built here (`weights=None`, Keras 3 on the JAX backend), with random weights and BatchNorm
parameters and statistics that are far from the identity, then saved in both file formats (Keras 3's
`.weights.h5` and the legacy HDF5 of `model.save('x.h5')`), imported, and compared on the same inputs.
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import pytest  # noqa: E402

keras = pytest.importorskip('keras')

# Keras' JAX backend converts arrays with a NumPy 2 copy keyword it does not pass on: thousands of identical warnings.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kdjax import checkpoint as ckpt_lib  # noqa: E402
from kdjax import trainer as trainer_lib
from kdjax import models  # noqa: E402
from kdjax import teacher as teacher_lib  # noqa: E402
from kdjax.errors import CheckpointMismatchError  # noqa: E402
from kdjax.tools import import_keras  # noqa: E402

SIZE = 64
BUILDERS = {'resnet50v2_imagenet': lambda: keras.applications.ResNet50V2,
            'mobilenetv2_imagenet': lambda: keras.applications.MobileNetV2}


def _random_keras(name, num_classes, seed):
  net = BUILDERS[name]()(weights=None, classes=num_classes, classifier_activation=None,
                         input_shape=(SIZE, SIZE, 3))
  rng = np.random.default_rng(seed)
  for layer in net.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
      layer.beta.assign(rng.uniform(-0.3, 0.3, c).astype(np.float32))
      layer.moving_mean.assign(rng.uniform(-0.3, 0.3, c).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))
    elif layer.weights:
      for w in layer.weights:
        if len(w.shape) > 1:  # kernels: He-scaled so that activations stay O(1) through the depth
          fan_in = int(np.prod(w.shape[:-1])) if 'depthwise' not in w.path else int(np.prod(w.shape[:2]))
          w.assign((rng.standard_normal(w.shape) * np.sqrt(1.0 / fan_in)).astype(np.float32))
        else:
          w.assign(rng.uniform(-0.1, 0.1, w.shape).astype(np.float32))
  return net


# ResNet50V2 (slow) and MobileNetV2 (the fast tier's Keras import).
@pytest.fixture(scope='module',
                params=[pytest.param('resnet50v2_imagenet', marks=pytest.mark.slow), 'mobilenetv2_imagenet'])
def keras_model(request, tmp_path_factory):
  name = request.param
  net = _random_keras(name, 7, seed=len(name))
  d = tmp_path_factory.mktemp(name)
  files = {'weights.h5': str(d / 'm.weights.h5'), 'legacy': str(d / 'm.h5')}
  net.save_weights(files['weights.h5'])
  net.save(files['legacy'])
  x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  return name, files, x, np.asarray(net(x, training=False)), [l.name for l in net.layers if l.weights]


def _logits(name, out_dir, x):
  net = models.create(name, num_classes=7, layout='keras')
  target = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.asarray(x)))
  variables, meta = ckpt_lib.load_model(out_dir, target)
  assert meta['model_kwargs'] == {'layout': 'keras'} and meta['num_classes'] == 7
  return np.asarray(net.apply(variables, jnp.asarray(x), train=False).logits)


@pytest.mark.parametrize('fmt', ['weights.h5', 'legacy'])
def test_imported_logits_match_keras(keras_model, fmt, tmp_path):
  name, files, x, expected, _ = keras_model
  out = str(tmp_path / 'run')
  assert import_keras.main(['--model', name, '--image_size', str(SIZE), files[fmt], out]) == 0
  got = _logits(name, out, x)
  diff = float(np.max(np.abs(got - expected)))
  scale = float(np.abs(expected).max())
  print(f'{name} ({fmt}): max |logit diff| = {diff:.2e} (logit scale {scale:.2f})')
  assert scale > 0.1 and np.std(expected) > 0.02 and diff < 1e-4 * max(1.0, scale), diff


def test_layer_order_is_keras_own(keras_model):
  """The written-down order of weighted layers (which numbers Keras 3's weight groups) is `model.layers`'."""
  name, _, _, _, weighted = keras_model
  assert [layer.keras_name for layer in import_keras.keras_layers(name)] == weighted


def test_other_architecture_names_first_mismatch(keras_model, tmp_path, capsys):
  name, files, _, _, _ = keras_model
  other = 'mobilenetv2_imagenet' if name == 'resnet50v2_imagenet' else 'resnet50v2_imagenet'
  for fmt in files:
    with pytest.raises(CheckpointMismatchError, match=f'has no counterpart in {other}|which {other} needs'):
      import_keras.convert(import_keras.read_weights(files[fmt], other), other, image_shape=(SIZE, SIZE, 3))
  assert import_keras.main(['--model', other, files['legacy'], str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err


def test_wrong_shape_names_weight_and_both_shapes(keras_model):
  name, files, _, _, _ = keras_model
  weights = import_keras.read_weights(files['legacy'], name)
  first = import_keras.keras_layers(name)[0].keras_name
  weights[first] = [w[..., :3] for w in weights[first][:1]] + weights[first][1:]
  with pytest.raises(CheckpointMismatchError, match=rf"Keras weight {first}/kernel has shape \(.*, 3\) but {name} "
                                                    r'expects \(.*\) at backbone/'):
    import_keras.convert(weights, name, image_shape=(SIZE, SIZE, 3))


def test_layout_mismatch_is_refused_when_loading(keras_model, tmp_path):
  name, files, _, _, _ = keras_model
  out = str(tmp_path / 'run')
  import_keras.import_checkpoint(files['weights.h5'], out, name, image_size=SIZE)
  meta = ckpt_lib.read_meta(out)
  with pytest.raises(CheckpointMismatchError, match="'keras'-layout .* config.teacher.kwargs gives layout 'torch'"):
    teacher_lib.check_meta(meta, out, name, 7, kwargs={})
  teacher_lib.check_meta(meta, out, name, 7, kwargs={'layout': 'keras'})


@pytest.mark.slow
def test_fine_tuning_starts_from_a_keras_file(keras_model):
  """`student.init_checkpoint` naming a `.h5` file: the backbone is the file's, the head new (10 classes, not 7);
  without the Keras layout the file is refused in one line."""
  name, files, _, _, _ = keras_model
  if name != 'mobilenetv2_imagenet':
    pytest.skip('one architecture is enough for the fine-tuning path')
  from kdjax import data as data_lib
  from kdjax import sharding
  from kdjax import step as step_lib
  from kdjax.errors import ConfigError
  from tests.util import digits_config
  rng = np.random.RandomState(0)
  split = lambda n: data_lib.Split(rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                   rng.randint(0, 10, (n,)).astype(np.int32))
  ds = data_lib.Dataset('synthetic', 10, split(64), split(16), None, (0.5,) * 3, (0.25,) * 3, 'none')
  cfg = digits_config(name, epochs=1, batch_size=32)
  cfg.student.init_checkpoint = files['legacy']
  cfg.student.kwargs = {'layout': 'keras'}
  exp = trainer_lib.build(cfg, ds, sharding.make_mesh(1))
  ts = exp.init_state()
  torch_layout = cfg.copy_and_resolve_references()
  torch_layout.student.kwargs = {}
  with pytest.raises(ConfigError, match="is a Keras weight file, but config.student.kwargs gives layout 'torch'"):
    teacher_lib.init_from_checkpoint(torch_layout, ds, exp, ts)
  ts = teacher_lib.init_from_checkpoint(cfg, ds, exp, ts)
  want = import_keras.convert(import_keras.read_weights(files['legacy'], name), name, image_shape=(32, 32, 3))
  got = step_lib.student(ts, 0)
  np.testing.assert_array_equal(got.params['student']['backbone']['features_5']['conv_1_0']['kernel'],
                                want['params']['backbone']['features_5']['conv_1_0']['kernel'])
  np.testing.assert_array_equal(got.state['student']['batch_stats']['backbone']['features_18_1']['var'],
                                want['batch_stats']['backbone']['features_18_1']['var'])
  assert got.params['student']['head']['kernel'].shape[-1] == 10
