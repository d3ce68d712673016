"""Import BiT `.npz` weights (google-research/big_transfer's public BiT-S / BiT-M files, the layout timm's
`resnetv2_*_bit` and big_vision's bit.py load) as kdjax checkpoints of kdjax/models/bit.py. big_vision's own
ResNet-V2 layout (its `bit_paper` model's names: `root_block/conv_root`, `block{i}/unit{jj}/conv{1,2,3}`, `gn{1,2,3}`,
`conv_proj`, `norm-pre-head`, a 2-D `head`; the names bare or under `params/` or `opt/target/`, the latter two as
big_vision's checkpoints save them, whose other entries (optimizer state) are left out) is read too: function
matching's teachers and students are saved that way. big_vision standardises its kernels with eps 1e-10 where
big_transfer's files are used (timm, kdjax) with 1e-8: for a filter whose variance is above 1e-3, a relative change
below 1e-5 in its standardised weights.

  python -m kdjax.tools.import_bit --model resnetv2_50x1_bit BiT-M-R50x1.npz runs/bit_m_r50x1
  python -m kdjax.tools.import_bit --model resnetv2_152x2_bit --dataset imagenet2012 BiT-M-R152x2-ILSVRC2012.npz \
      teachers/bit_r152x2

The file is read with `np.load(allow_pickle=False)`: arrays only, no code. Names may carry big_transfer's 'resnet/'
prefix or none. Every variable of the model must be filled by exactly one array of the right shape and every array
of the file must be used; otherwise one line names the first offending weight and both shapes. `--num_classes`
defaults to the width of the file's head (BiT-M's 21,843 ImageNet-21k classes, or a fine-tuned head).
"""

from __future__ import annotations

import kdjax.platform  # noqa: F401  (before jax: selects CPU quietly when there is no accelerator)

import sys
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.errors import CheckpointMismatchError, ConfigError
from kdjax.tools import import_torch

MODELS = ('resnetv2_50x1_bit', 'resnetv2_101x1_bit', 'resnetv2_152x2_bit', 'resnetv2_test_bit')
PREFIX = 'resnet/'
_CONV = 'standardized_conv2d/kernel'


def npz_name(path: tuple) -> str:
  """The BiT file's name (without the prefix) of one of our variables ('params', 'backbone', ..., leaf)."""
  _, *where, leaf = path
  gn = {'scale': 'gamma', 'bias': 'beta'}
  if where == ['head']:
    return f'head/conv2d/{leaf}'
  if where == ['backbone', 'root']:
    return f'root_block/{_CONV}'
  if where == ['backbone', 'final_gn']:
    return f'group_norm/{gn[leaf]}'
  _, unit, part = where
  block, j = unit.split('_unit')
  stem = f'{block}/unit{int(j):02d}'
  if part == 'proj':
    return f'{stem}/a/proj/{_CONV}'
  if part.endswith('_gn'):
    return f'{stem}/{part[0]}/group_norm/{gn[leaf]}'
  return f'{stem}/{part}/{_CONV}'


def read_npz(path: str) -> dict[str, np.ndarray]:
  """{name without the prefix: array} of a BiT `.npz`."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f'cannot read {path} as a .npz of arrays: {why}') from None
  return from_big_vision({k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in arrays.items()})


BIG_VISION_ROOT = 'root_block/conv_root/kernel'
BIG_VISION_PREFIXES = ('params/', 'opt/target/', '')


def big_transfer_name(name: str) -> str:
  """big_vision's `bit_paper` name of a weight -> big_transfer's (`npz_name`'s); a name it does not know unchanged
  (so that `convert` names it)."""
  fixed = {BIG_VISION_ROOT: f'root_block/{_CONV}', 'norm-pre-head/scale': 'group_norm/gamma',
           'norm-pre-head/bias': 'group_norm/beta', 'head/kernel': 'head/conv2d/kernel',
           'head/bias': 'head/conv2d/bias'}
  if name in fixed:
    return fixed[name]
  parts = name.split('/')
  if len(parts) != 4 or not parts[0].startswith('block') or not parts[1].startswith('unit'):
    return name
  stem, layer, leaf = '/'.join(parts[:2]), parts[2], parts[3]
  if layer == 'conv_proj' and leaf == 'kernel':
    return f'{stem}/a/proj/{_CONV}'
  if layer in ('conv1', 'conv2', 'conv3') and leaf == 'kernel':
    return f'{stem}/{"abc"[int(layer[-1]) - 1]}/{_CONV}'
  if layer in ('gn1', 'gn2', 'gn3') and leaf in ('scale', 'bias'):
    return f'{stem}/{"abc"[int(layer[-1]) - 1]}/group_norm/{"gamma" if leaf == "scale" else "beta"}'
  return name


def from_big_vision(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A file in big_vision's layout renamed to big_transfer's (`convert` reshapes its [1, 1, 1, C] norms and 2-D
  head); any other file unchanged."""
  prefix = next((p for p in BIG_VISION_PREFIXES if p + BIG_VISION_ROOT in arrays), None)
  if prefix is None:
    return arrays
  return {big_transfer_name(k[len(prefix):]): v for k, v in arrays.items() if k.startswith(prefix)}


def convert(arrays: dict[str, np.ndarray], model: str, num_classes: int | None = None,
            image_shape=(224, 224, 3)) -> dict:
  """BiT arrays (`read_npz`) -> {'params'} of `models.create(model)`."""
  if num_classes is None:
    head = arrays.get('head/conv2d/bias')
    if head is None:
      raise CheckpointMismatchError('cannot infer num_classes: the file has no head/conv2d/bias; pass --num_classes')
    num_classes = int(head.shape[-1])
  net = models.create(model, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
  flat_shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  names = {npz_name(key): key for key in flat_shapes}
  extra = next((n for n in arrays if n not in names), None)
  if extra is not None:
    raise CheckpointMismatchError(f'BiT weight {extra!r} (shape {tuple(arrays[extra].shape)}) has no counterpart in '
                                  f'{model}: the file holds another architecture than {model}')
  flat = {}
  for name, key in names.items():
    want = tuple(flat_shapes[key].shape)
    if name not in arrays:
      raise CheckpointMismatchError(f'the file has no BiT weight {name!r} (shape {want} in {model}): it holds another '
                                    f'architecture than {model}')
    value = arrays[name]
    if name == 'head/conv2d/kernel' and value.ndim == 4:  # a 1x1 convolution: [1, 1, C, classes] -> [C, classes]
      value = value.reshape(value.shape[2:]) if value.shape[:2] == (1, 1) else value
    elif value.ndim > len(want) and value.size == int(np.prod(want)):  # norms stored [1, 1, 1, C]
      value = value.reshape(want)
    if tuple(value.shape) != want:
      raise CheckpointMismatchError(f'BiT weight {name} has shape {tuple(arrays[name].shape)} but {model} expects '
                                    f'{want} at {"/".join(key[1:])}')
    flat[key] = jnp.asarray(value, flat_shapes[key].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def import_checkpoint(path: str, out_dir: str, model: str, num_classes: int | None = None,
                      dataset: str = 'imagenet2012', image_size: int = 224, overwrite: bool = False) -> dict:
  """Reads a BiT `.npz`, converts it for `model` and writes a model-only kdjax checkpoint to `out_dir`."""
  if model not in MODELS:
    raise ConfigError(f'--model must be one of {", ".join(MODELS)}, got {model!r}')
  import_torch.check_sizes(image_size, num_classes)
  import_torch.prepare_output(out_dir, overwrite)
  image_shape = [image_size, image_size, 3]
  variables = convert(read_npz(path), model, num_classes, image_shape)
  return import_torch.save_import(out_dir, variables, model, {}, dataset, image_shape, path)


def main(argv=None) -> int:
  return import_torch.weights_file_main('python -m kdjax.tools.import_bit', __doc__, MODELS, import_checkpoint, argv)


if __name__ == '__main__':
  sys.exit(main())
