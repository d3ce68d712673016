"""Import Keras weight files of `keras.applications.ResNet50V2` / `MobileNetV2` as kdjax checkpoints.

  python -m kdjax.tools.import_keras --model mobilenetv2_imagenet mobilenet_v2_weights.h5 runs/mbv2_keras
  python -m kdjax.tools.import_keras --model resnet50v2_imagenet --num_classes 3 mhist_r50v2.weights.h5 runs/r50v2

The imported network is built with `layout='keras'` (Keras' padding and BatchNorm epsilon), recorded in the
checkpoint's meta: a config that uses it names the same kwargs (`--config.teacher.kwargs="{'layout': 'keras'}"`, or
`student.kwargs` for fine-tuning), and a mismatch is refused when the checkpoint is loaded.

Accepted files (read with h5py; Keras itself is not needed):
  * the legacy HDF5 format: Keras' published ImageNet weights (`*_weights_tf_dim_ordering_tf_kernels*.h5`), and
    `model.save('x.h5')` / `model.save_weights('x.h5')` of Keras 2: layers found by their names (`layer_names` and
    `weight_names` attributes, at the root or under `model_weights`);
  * Keras 3's `model.save_weights('x.weights.h5')`: `layers/<class name>[_k]/vars/<i>`, where Keras numbers the
    layers of each class in the order of `model.layers`. That order is written down below per architecture (and
    checked against Keras by the tests).

Every one of our leaves must be filled by exactly one Keras weight of the right shape and every Keras weight must be
used; otherwise one line names the first offending weight and both shapes. A classifier of another width is taken
as such (`--num_classes` defaults to the file's), which is how a fine-tuned MHIST model (3 classes, say) imports.

Layouts: Conv2D kernels are HWIO as ours; DepthwiseConv2D kernels [kh, kw, C, 1] become our grouped-conv kernels
[kh, kw, 1, C]; BatchNormalization (gamma, beta, moving_mean, moving_variance) -> scale, bias, mean, var; Dense
kernels are [in, out] as ours.
"""

from __future__ import annotations

import kdjax.platform  # noqa: F401  (before jax: selects CPU quietly when there is no accelerator)

import dataclasses
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from kdjax.tools import import_torch

# Keras class -> (our leaves in the order of the layer's weights, the snake-case name Keras 3 files use).
_CLASSES = {
    'Conv2D': (('kernel',), 'conv2d'),
    'Conv2D+bias': (('kernel', 'bias'), 'conv2d'),
    'DepthwiseConv2D': (('kernel',), 'depthwise_conv2d'),
    'BatchNormalization': (('scale', 'bias', 'mean', 'var'), 'batch_normalization'),
    'Dense': (('kernel', 'bias'), 'dense'),
}
MODELS = ('resnet50v2_imagenet', 'mobilenetv2_imagenet')


@dataclasses.dataclass(frozen=True)
class _Layer:
  keras_name: str
  keras_class: str      # a key of _CLASSES
  path: tuple           # our module path: ('backbone', name) or ('head',)


def _resnet50v2_layers(blocks=(3, 4, 6, 3)) -> list[_Layer]:
  """keras.applications.ResNet50V2's weighted layers in `model.layers` order: in the first block of a stage the
  shortcut's 1x1 conv (`_0_conv`) comes after `_2_bn`."""
  out = [_Layer('conv1_conv', 'Conv2D+bias', ('backbone', 'conv1_conv'))]
  for s, n in enumerate(blocks, start=2):
    for b in range(1, n + 1):
      name = f'conv{s}_block{b}'
      seq = [('preact_bn', 'BatchNormalization'), ('1_conv', 'Conv2D'), ('1_bn', 'BatchNormalization'),
             ('2_conv', 'Conv2D'), ('2_bn', 'BatchNormalization')]
      if b == 1:
        seq.append(('0_conv', 'Conv2D+bias'))
      seq.append(('3_conv', 'Conv2D+bias'))
      out += [_Layer(f'{name}_{suffix}', cls, ('backbone', f'{name}_{suffix}')) for suffix, cls in seq]
  out.append(_Layer('post_bn', 'BatchNormalization', ('backbone', 'post_bn')))
  out.append(_Layer('predictions', 'Dense', ('head',)))
  return out


def _mobilenetv2_layers() -> list[_Layer]:
  """keras.applications.MobileNetV2's weighted layers in order, mapped onto torchvision's module names (ours):
  Conv1 -> features_0, expanded_conv -> features_1, block_k -> features_{k+1}, Conv_1 -> features_18."""
  bn = 'BatchNormalization'
  out = [_Layer('Conv1', 'Conv2D', ('backbone', 'features_0_0')),
         _Layer('bn_Conv1', bn, ('backbone', 'features_0_1'))]
  f = ('backbone', 'features_1')
  out += [_Layer('expanded_conv_depthwise', 'DepthwiseConv2D', f + ('conv_0_0',)),
          _Layer('expanded_conv_depthwise_BN', bn, f + ('conv_0_1',)),
          _Layer('expanded_conv_project', 'Conv2D', f + ('conv_1',)),
          _Layer('expanded_conv_project_BN', bn, f + ('conv_2',))]
  for k in range(1, 17):
    f, p = ('backbone', f'features_{k + 1}'), f'block_{k}'
    out += [_Layer(f'{p}_expand', 'Conv2D', f + ('conv_0_0',)), _Layer(f'{p}_expand_BN', bn, f + ('conv_0_1',)),
            _Layer(f'{p}_depthwise', 'DepthwiseConv2D', f + ('conv_1_0',)),
            _Layer(f'{p}_depthwise_BN', bn, f + ('conv_1_1',)),
            _Layer(f'{p}_project', 'Conv2D', f + ('conv_2',)), _Layer(f'{p}_project_BN', bn, f + ('conv_3',))]
  out += [_Layer('Conv_1', 'Conv2D', ('backbone', 'features_18_0')),
          _Layer('Conv_1_bn', bn, ('backbone', 'features_18_1')), _Layer('predictions', 'Dense', ('head',))]
  return out


_LAYERS = {'resnet50v2_imagenet': _resnet50v2_layers, 'mobilenetv2_imagenet': _mobilenetv2_layers}


def keras_layers(model: str) -> list[_Layer]:
  if model not in _LAYERS:
    raise ConfigError(f'no Keras layout for model {model!r}; importable models: {", ".join(MODELS)}')
  return _LAYERS[model]()


def _keras3_names(layers: list[_Layer]) -> list[str]:
  """The `layers/<name>` group of each layer in a Keras 3 `.weights.h5`: its class's snake-case name, suffixed
  `_k` for the k-th (k >= 1) layer of that class in `model.layers` order."""
  counts, names = {}, []
  for layer in layers:
    base = _CLASSES[layer.keras_class][1]
    k = counts.get(base, 0)
    counts[base] = k + 1
    names.append(base if k == 0 else f'{base}_{k}')
  return names


def read_weights(path: str, model: str) -> dict[str, list[np.ndarray]]:
  """{Keras layer name: its weights in Keras order} from either file format."""
  import h5py  # lazily: only the importer needs it
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f'no Keras weight file at {path}')
  layers = keras_layers(model)
  if not h5py.is_hdf5(path):
    with open(path, 'rb') as f:
      head = f.read(8)
    raise ConfigError(f'{path} is not an HDF5 file (Keras weight files, .h5 or .weights.h5, are): it starts with '
                      f'{head!r}')
  try:
    f = h5py.File(path, 'r')
  except OSError as e:  # a cut or damaged HDF5 file
    raise ConfigError(f'cannot read the HDF5 file {path}: {" ".join(str(e).split())}') from None
  with f:
    root = f['model_weights'] if 'model_weights' in f else f
    if 'layer_names' in root.attrs:  # legacy HDF5: names as Keras gave them
      out = {}
      for raw in root.attrs['layer_names']:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        group = root[name]
        weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get('weight_names', [])]
        if weight_names:
          out[name] = [np.asarray(group[w]) for w in weight_names]
      return out
    if 'layers' in f:  # Keras 3 .weights.h5: class-numbered groups, mapped back through the layer order
      by_auto = dict(zip(_keras3_names(layers), (layer.keras_name for layer in layers)))
      out = {}
      for auto, group in f['layers'].items():
        variables = group.get('vars')
        if variables is None or not len(variables):
          continue
        if auto not in by_auto:
          raise CheckpointMismatchError(f'Keras weight group layers/{auto} has no counterpart in {model}: the file '
                                        f'holds another architecture than {model}')
        out[by_auto[auto]] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
      return out
  raise CheckpointMismatchError(f'{path} is neither a legacy Keras HDF5 file (no layer_names) nor a Keras 3 '
                                '.weights.h5 (no layers group)')


def convert(weights: dict[str, list[np.ndarray]], model: str, num_classes: int | None = None,
            image_shape=(224, 224, 3)) -> dict:
  """Keras weights (`read_weights`) -> {'params', 'batch_stats'} of `models.create(model, layout='keras')`."""
  layers = keras_layers(model)
  if num_classes is None:
    head = weights.get('predictions')
    if not head:
      raise CheckpointMismatchError('cannot infer num_classes: the file has no predictions layer; pass --num_classes')
    num_classes = int(head[-1].shape[0])
  net = models.create(model, num_classes=num_classes, layout='keras')
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
  flat_shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  flat = {}
  known = {layer.keras_name for layer in layers}
  for name in weights:
    if name not in known:
      shapes_ = [tuple(w.shape) for w in weights[name]]
      raise CheckpointMismatchError(f'Keras layer {name!r} (weights {shapes_}) has no counterpart in {model}: the '
                                    f'file holds another architecture than {model}')
  for layer in layers:
    leaves = _CLASSES[layer.keras_class][0]
    if layer.keras_name not in weights:
      raise CheckpointMismatchError(f'the file has no Keras layer {layer.keras_name!r}, which {model} needs: it '
                                    f'holds another architecture than {model}')
    values = weights[layer.keras_name]
    if len(values) != len(leaves):
      raise CheckpointMismatchError(f'Keras layer {layer.keras_name!r} has {len(values)} weights, {model} expects '
                                    f'{len(leaves)} ({", ".join(leaves)})')
    for leaf, value in zip(leaves, values):
      collection = 'batch_stats' if leaf in ('mean', 'var') else 'params'
      key = (collection,) + layer.path + (leaf,)
      if key not in flat_shapes:
        raise AssertionError(f'{"/".join(key)} is not a variable of {model}')  # a bug in the layer table
      want = tuple(flat_shapes[key].shape)
      if layer.keras_class == 'DepthwiseConv2D':  # [kh, kw, C, 1] -> [kh, kw, 1, C]
        value = np.transpose(value, (0, 1, 3, 2))
      if tuple(value.shape) != want:
        raise CheckpointMismatchError(f'Keras weight {layer.keras_name}/{leaf} has shape {tuple(value.shape)} but '
                                      f'{model} expects {want} at {"/".join(key[1:])}')
      flat[key] = jnp.asarray(value, flat_shapes[key].dtype)
  missing = set(flat_shapes) - set(flat)
  if missing:
    raise AssertionError(f'variables of {model} not filled by the layer table: {sorted(missing)[:3]}')
  return flax.traverse_util.unflatten_dict(flat)


def import_checkpoint(path: str, out_dir: str, model: str, num_classes: int | None = None,
                      dataset: str = 'imagenet2012', image_size: int = 224, overwrite: bool = False) -> dict:
  """Reads a Keras weight file, converts it for `model` and writes a model-only kdjax checkpoint to `out_dir`."""
  import_torch.check_sizes(image_size, num_classes)
  import_torch.prepare_output(out_dir, overwrite)
  image_shape = [image_size, image_size, 3]
  variables = convert(read_weights(path, model), model, num_classes, image_shape)
  return import_torch.save_import(out_dir, variables, model, {'layout': 'keras'}, dataset, image_shape, path)


def main(argv=None) -> int:
  return import_torch.weights_file_main('python -m kdjax.tools.import_keras', __doc__, MODELS, import_checkpoint, argv,
                                       note='; use it with --config.teacher.kwargs="{\'layout\': \'keras\'}"')


if __name__ == '__main__':
  sys.exit(main())
