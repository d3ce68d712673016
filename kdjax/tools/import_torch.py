"""Import a PyTorch teacher of the reference KD codebases as a kdjax checkpoint.

  python -m kdjax.tools.import_torch --model resnet32x4 --num_classes 100 resnet32x4_cifar100.pth runs/t_res32x4

The output directory is then what `config.teacher.checkpoint` (or `student.init_checkpoint`) names. With
`--extras METHOD` (instead of `--model`) the file is the state_dict of a method's extra module (FitNet's regressor,
CRD's embedding heads: kdjax/tools/torch_extras.py), and the directory what `config.distill.extras_checkpoint` names.

Accepted files: the state_dicts of the CIFAR models of RepDistiller (HobbitLong/RepDistiller), SimKD
(DefangChen/SimKD) and mdistiller (megvii-research/mdistiller), which share their module names; torchvision's ImageNet
`resnet18/34/50` and `mobilenet_v2` (as `resnet18_imagenet` ... `mobilenetv2_imagenet`, e.g. the files
`torchvision.models.resnet34(weights=...)` caches) and mdistiller's ImageNet MobileNetV1 (`mobilenetv1_imagenet`),
with `--image_size 224 --dataset imagenet2012`; timm's and DeiT's ViTs (`deit_tiny`, `deit_small_distilled`, ...:
kdjax/models/vit.py), from DeiT's release `.pth` files or timm's `.safetensors` files (read with the safetensors
package, which holds tensors only: no torch needed, nothing run). Saved as
`{'model': state_dict, ...}` (RepDistiller, SimKD, mdistiller teachers), `{'net': state_dict, ...}`,
`{'state_dict': state_dict, ...}` or a bare state_dict; a `module.` prefix (DataParallel) is stripped. The file is
read with `torch.load(weights_only=True)`, which runs no code from it; a file that this refuses (e.g. a checkpoint
that also pickles an argparse Namespace) is refused in one line, unless `--trust_file` is given: then it is read
with `weights_only=False`, which runs whatever code the pickle names, so pass it only for files you trust. A file
that is not torch.save's output (text, a .npy, an HDF5 file) or is cut short is refused in one line.

The mapping is derived, not tabulated: for every leaf of our variable tree the PyTorch key is computed from its path
(`layer1_0/conv1/kernel` -> `layer1.0.conv1.weight`: every `_<digits>` becomes `.<digits>`, `/` becomes `.`, the
leaf is renamed) plus a small per-family rule (`FAMILY_RULES`: the classifier's name, and renames such as
`downsample_conv` -> `downsample.0`). Every leaf must be filled by exactly one tensor of the right shape and every
tensor must be used (`num_batches_tracked` is dropped); otherwise a one-line `CheckpointMismatchError` names the first
offending key and both shapes (in PyTorch layout).

Layout conversions: Conv2d weight [O, I/groups, kh, kw] -> kernel [kh, kw, I/groups, O] (grouped and depthwise
convs included); Linear weight [out, in] -> kernel [in, out]; BatchNorm weight/bias -> scale/bias,
running_mean/running_var -> batch_stats mean/var. PyTorch's BatchNorm eps (1e-5) is the one `layers.batch_norm`
uses, so eval-mode outputs match.

torch is imported lazily, only when a file is read; `convert` works on any mapping of array-likes.
"""

from __future__ import annotations

import kdjax.platform  # noqa: F401  (before jax: selects CPU quietly when there is no accelerator)

import argparse
import dataclasses
import logging
import os
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint as ckpt_lib
from kdjax import models
from kdjax.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError, KDError

# Keys under which the reference codebases nest the state_dict in their checkpoint files, tried in this order.
WRAPPER_KEYS = ('model', 'net', 'state_dict', 'model_state_dict')
DROPPED_SUFFIXES = ('.num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class FamilyRule:
  """How one backbone class names its modules in the reference code.

  `head`: the reference's classifier module (our `head`). `renames`: regex substitutions applied, in order, to the
  dotted module path that the generic rule derives from our backbone path (e.g. 'layer1.0.downsample_conv').
  `tensors`: parameters of the backbone itself (not of a layer) that keep their name (ViT's 'cls_token').
  `head_dist`: the reference's distillation head (our `head_dist`, a DeiT with a distillation token).
  """
  head: str
  renames: tuple[tuple[str, str], ...] = ()
  tensors: tuple[str, ...] = ()
  head_dist: str = 'head_dist'


# Keyed by the backbone class ('module.QualName'); a model is importable iff its backbone class is listed here.
FAMILY_RULES: dict[str, FamilyRule] = {
    # RepDistiller models/resnet.py: the projection shortcut is `downsample = Sequential(conv, bn)`.
    'kdjax.models.cifar_resnet.CifarResNet': FamilyRule(
        'fc', ((r'\bdownsample_conv\b', 'downsample.0'), (r'\bdownsample_bn\b', 'downsample.1'))),
    # RepDistiller models/resnetv2.py (ResNet18/34/50): `shortcut = Sequential(conv, bn)`, classifier `linear`.
    'kdjax.models.resnet_large.ResNet': FamilyRule(
        'linear', ((r'\bshortcut_conv\b', 'shortcut.0'), (r'\bshortcut_bn\b', 'shortcut.1'))),
    # models/wrn.py: block{i} is a NetworkBlock whose blocks sit in its `layer` Sequential.
    'kdjax.models.wrn.WideResNet': FamilyRule('fc', ((r'^block(\d+)\.(\d+)\b', r'block\1.layer.\2'),)),
    # models/vgg.py: block{b} Sequentials, our names keep their indices.
    'kdjax.models.vgg.VGG': FamilyRule('classifier'),
    # models/mobilenetv2.py: the classifier is `Sequential(Linear)`.
    'kdjax.models.mobilenetv2.MobileNetV2': FamilyRule('classifier.0'),
    'kdjax.models.shufflenet.ShuffleNetV1': FamilyRule('linear'),
    'kdjax.models.shufflenet.ShuffleNetV2': FamilyRule('linear'),
    # torchvision.models.resnet{18,34,50}: as the CIFAR ResNets, `downsample = Sequential(conv, bn)`, `fc`.
    'kdjax.models.imagenet.TorchvisionResNet': FamilyRule(
        'fc', ((r'\bdownsample_conv\b', 'downsample.0'), (r'\bdownsample_bn\b', 'downsample.1'))),
    # mdistiller models/imagenet/mobilenetv1.py: `model.{i}.{j}`, `fc`.
    'kdjax.models.imagenet.MobileNetV1': FamilyRule('fc'),
    # torchvision.models.mobilenet_v2: `features.{i}...`, classifier = Sequential(Dropout, Linear).
    'kdjax.models.imagenet.MobileNetV2ImageNet': FamilyRule('classifier.1'),
    # timm's VisionTransformer / VisionTransformerDistilled (DeiT): our module names are timm's.
    'kdjax.models.vit.ViT': FamilyRule('head', tensors=('cls_token', 'dist_token', 'pos_embed')),
}

# (collection, leaf name) -> PyTorch parameter/buffer name.
_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One leaf of our tree and the PyTorch tensor that fills it."""
  path: tuple[str, ...]       # flattened variables path: (collection, 'backbone' | 'head', ..., leaf)
  torch_key: str
  torch_shape: tuple[int, ...]  # the shape the tensor must have in PyTorch layout
  shape: tuple[int, ...]        # our shape
  dtype: Any
  perm: tuple[int, ...] | None  # np.transpose axes from PyTorch layout to ours, None for identity

  @property
  def where(self) -> str:
    collection, *rest = self.path
    return '/'.join(rest if collection == 'params' else self.path)


def _family(model) -> tuple[str, FamilyRule]:
  cls = type(model.backbone)
  family = f'{cls.__module__}.{cls.__qualname__}'
  return family, FAMILY_RULES.get(family)


def supported_models() -> list[str]:
  """Registered model names whose architecture has a PyTorch naming rule."""
  return [n for n in models.names() if _family(models.create(n, num_classes=10))[1] is not None]


def torch_module_path(rule: FamilyRule, module_path: tuple[str, ...]) -> str:
  """Our backbone module path (('layer1_0', 'downsample_conv')) -> the reference's ('layer1.0.downsample.0')."""
  dotted = re.sub(r'_(?=\d+(?:[._]|$))', '.', '.'.join(module_path))
  for pattern, repl in rule.renames:
    dotted = re.sub(pattern, repl, dotted)
  return dotted


def _layout(collection: str, leaf: str, shape: tuple[int, ...]):
  """(PyTorch shape, transpose from PyTorch layout to ours) of one of our leaves."""
  if collection == 'params' and leaf == 'kernel':
    if len(shape) == 4:  # Conv2d [O, I/g, kh, kw] <-> HWIO [kh, kw, I/g, O]
      return (shape[3], shape[2], shape[0], shape[1]), (2, 3, 1, 0)
    if len(shape) == 2:  # Linear [out, in] <-> [in, out]
      return (shape[1], shape[0]), (1, 0)
    raise ConfigError(f'no PyTorch layout for a {len(shape)}-d kernel {shape}')
  return shape, None


def _rule(name: str, model) -> FamilyRule:
  family, rule = _family(model)
  if rule is None:
    raise ConfigError(f'no PyTorch naming rule for model {name!r} (backbone {family}); importable models: '
                      f'{", ".join(supported_models())}')
  return rule


def _slots(name: str, model, shapes) -> list[_Slot]:
  rule = _rule(name, model)
  slots, seen = [], {}
  for path, s in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items():
    collection, top, *modules, leaf = path
    torch_leaf = _LEAF_NAMES.get((collection, leaf))
    if top == 'backbone' and not modules and leaf in rule.tensors:
      torch_leaf = leaf
    if torch_leaf is None:
      raise ConfigError(f'model {name!r} has a variable {"/".join(path)} with no PyTorch counterpart')
    if top in ('head', 'head_dist'):
      prefix = '.'.join([rule.head if top == 'head' else rule.head_dist] + list(modules))
    elif top == 'backbone':
      prefix = torch_module_path(rule, tuple(modules))
    else:
      raise ConfigError(f'model {name!r} has a variable {"/".join(path)} outside backbone/head')
    key = f'{prefix}.{torch_leaf}' if prefix else torch_leaf
    if key in seen:  # a naming rule that sends two of our leaves to one key is a bug in FAMILY_RULES
      raise AssertionError(f'{"/".join(path)} and {"/".join(seen[key])} both map to {key!r}')
    seen[key] = path
    torch_shape, perm = _layout(collection, leaf, tuple(s.shape))
    slots.append(_Slot(path, key, torch_shape, tuple(s.shape), s.dtype, perm))
  return slots


def _shape(a) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(a))


def convert(state_dict: Mapping[str, Any], model: str, num_classes: int | None = None,
            image_shape=(32, 32, 3), model_kwargs: Mapping[str, Any] | None = None) -> dict:
  """Maps a (bare, prefix-stripped) PyTorch state_dict onto the variables of
  `models.create(model, num_classes, **model_kwargs)` for inputs of `image_shape` (a ViT's position embeddings
  depend on it).

  `state_dict` values are array-likes (numpy arrays; `load_state_dict` turns tensors into those). `num_classes`
  defaults to the classifier's output width in the state_dict. Returns {'params': ..., 'batch_stats': ...} as jax
  arrays. Raises CheckpointMismatchError naming the first key that is unexpected, missing or of the wrong shape.
  """
  if num_classes is None:
    num_classes = _infer_num_classes(state_dict, model)
  net = models.create(model, num_classes=num_classes, **dict(model_kwargs or {}))
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
  slots = _slots(model, net, shapes)
  by_key = {s.torch_key: s for s in slots}

  flat, used = {}, set()
  for key, value in state_dict.items():
    if key.endswith(DROPPED_SUFFIXES):
      continue
    slot = by_key.get(key)
    if slot is None:
      raise CheckpointMismatchError(
          f'state_dict key {key!r} (shape {_shape(value)}) has no counterpart in {model}: the checkpoint holds '
          f'another architecture (or a different naming) than {model}')
    if _shape(value) != slot.torch_shape:
      raise CheckpointMismatchError(f'state_dict key {key!r} has shape {_shape(value)} but {model} expects '
                                    f'{slot.torch_shape} at {slot.where}')
    array = np.asarray(value)
    if slot.perm is not None:
      array = np.transpose(array, slot.perm)
    flat[slot.path] = jnp.asarray(np.ascontiguousarray(array), dtype=slot.dtype)
    used.add(key)
  missing = [s for s in slots if s.torch_key not in used]
  if missing:
    s = missing[0]
    raise CheckpointMismatchError(
        f'state_dict has no key {s.torch_key!r}, which {model} needs with shape {s.torch_shape} at {s.where} '
        f'({len(missing)} of {len(slots)} tensors missing): the checkpoint holds another architecture than {model}')
  return flax.traverse_util.unflatten_dict(flat)


def _infer_num_classes(state_dict: Mapping[str, Any], model: str) -> int:
  key = f'{_rule(model, models.create(model, num_classes=10)).head}.bias'
  if key not in state_dict:
    raise CheckpointMismatchError(f'cannot infer num_classes: state_dict has no key {key!r} (classifier of '
                                  f'{model}); pass --num_classes')
  return _shape(state_dict[key])[0]


# --------------------------------------------------------------------------------------------------- reading files


def extract_state_dict(obj: Any) -> dict[str, Any]:
  """The state_dict inside a loaded checkpoint object, with DataParallel's 'module.' prefix stripped."""
  for _ in range(3):  # {'model': {'state_dict': ...}} at most this deep in practice
    if hasattr(obj, 'state_dict') and callable(obj.state_dict) and not isinstance(obj, Mapping):
      obj = obj.state_dict()  # a pickled nn.Module
    if not isinstance(obj, Mapping):
      break
    inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and (isinstance(obj[k], Mapping) or
                                                                  hasattr(obj[k], 'state_dict'))), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
    raise CheckpointMismatchError(f'not a state_dict: found a {type(obj).__name__}')
  tensors = {k: v for k, v in obj.items() if hasattr(v, 'shape')}
  if not tensors:
    raise CheckpointMismatchError(
        f'no state_dict found: the file is a dict with keys {sorted(obj)[:10]} and none of them '
        f'({", ".join(WRAPPER_KEYS)}) holds the tensors')
  if len(tensors) != len(obj):
    bad = next(k for k in obj if k not in tensors)
    raise CheckpointMismatchError(f'not a state_dict: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor')
  out = {}
  for k, v in tensors.items():
    k2 = k[len('module.'):] if k.startswith('module.') else k
    if k2 in out:
      raise CheckpointMismatchError(f'state_dict has both {k!r} and {k2!r}')
    out[k2] = v
  return out


def _to_numpy(t) -> np.ndarray:
  if hasattr(t, 'detach'):  # torch.Tensor (bfloat16 has no numpy dtype: go through float32)
    t = t.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    return t.numpy()
  return np.asarray(t)


# What a file that torch.save wrote starts with: a zip archive (torch >= 1.6), or a pickle (the legacy format).
_TORCH_MAGICS = (b'PK\x03\x04', b'\x80')
# What other files a user may pass start with, for the refusal's wording.
_OTHER_MAGICS = ((b'\x93NUMPY', 'a NumPy .npy file'), (b'\x89HDF\r\n\x1a\n', 'an HDF5 file (Keras weights: use '
                 'kdjax.tools.import_keras)'), (b'\x1f\x8b', 'a gzip file'))


def _is_safetensors(path: str) -> bool:
  """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON starting with '{'."""
  with open(path, 'rb') as f:
    head = f.read(9)
  return len(head) == 9 and head[8:9] == b'{' and 2 <= int.from_bytes(head[:8], 'little') <= os.path.getsize(path)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file (timm's and the Hugging Face hub's weights) as {key: numpy array}; the format holds tensors
  only, so nothing in it runs. bfloat16 tensors come back as float32."""
  try:
    from safetensors import safe_open
  except ImportError as e:
    raise ConfigError('reading a .safetensors file needs the safetensors package: pip install safetensors') from e
  out = {}
  try:
    with safe_open(path, framework='numpy') as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key), dtype=np.float32 if f.get_slice(key).get_dtype() == 'BF16' else None)
  except Exception as e:  # pylint: disable=broad-except  (a damaged header or a cut file)
    raise ConfigError(f'cannot read {path}: {type(e).__name__}: {" ".join(str(e).split())[:300]}') from None
  return extract_state_dict(out)


def _kind_of_file(path: str) -> str | None:
  """None for a file that may be torch.save's output, else what it is instead (for a one-line refusal)."""
  with open(path, 'rb') as f:
    head = f.read(8)
  if head.startswith(_TORCH_MAGICS):
    return None
  for magic, what in _OTHER_MAGICS:
    if head.startswith(magic):
      return what
  if not head:
    return 'empty'
  return f'not a file torch.save writes (a zip archive or a pickle): it starts with {head!r}'


def _torch_reason(e: Exception) -> tuple[str, bool]:
  """The line of torch.load's many-line message that says what is wrong, and whether weights_only=False might read
  the file (it refused a pickle as unsafe, rather than failing on damaged bytes)."""
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
  m = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', text, re.I)
  if m:
    module, _, name = m[1].rpartition('.')
    if module in sys.modules and not hasattr(sys.modules[module], name):  # nothing is imported to find out
      return f'it names {m[1]}, which does not exist: the file is damaged or truncated', False
    return f'it pickles {m[1]}, not only tensors', True
  m = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\n\n|$)', text, re.S)
  # Else the first paragraph that is not torch's advice (which suggests weights_only=False).
  paragraphs = [p for p in re.split(r'\n\s*\n', text.strip())
                if p.strip() and not p.lstrip().startswith(('Weights only load failed', 'Check the documentation'))]
  line = m[1] if m else (paragraphs or [text.strip() or type(e).__name__])[0]
  line = re.split(r'(?<=\.) ', ' '.join(line.split()))[0]  # the first sentence
  unsafe = isinstance(e, pickle.UnpicklingError)
  line = line[:300].rstrip('.')
  return f'{type(e).__name__}: {line}{"" if unsafe else "; the file is damaged or truncated"}', unsafe


def load_state_dict(path: str, trust_file: bool = False) -> dict[str, np.ndarray]:
  """Reads a .pth/.pt/.tar file of any of the accepted layouts (or a .safetensors file: `load_safetensors`) into
  {key: numpy array}. Imports torch for the former.

  The file is read with `torch.load(weights_only=True)`, which builds tensors and plain containers only and runs no
  code from the file. A file it refuses (e.g. a RepDistiller checkpoint that also pickles an argparse.Namespace) is
  refused in one line; with `trust_file=True` (the CLI's --trust_file) such a file is read again with
  `weights_only=False`, with a warning: that runs any code the file's pickle names, so only for files from a source
  you trust. A damaged or truncated file is refused either way."""
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f'PyTorch checkpoint {path} does not exist')
  if _is_safetensors(path):
    return load_safetensors(path)
  kind = _kind_of_file(path)
  if kind is not None:
    raise ConfigError(f'{path} is not a PyTorch checkpoint: {kind}')
  try:
    import torch
  except ImportError as e:
    raise ConfigError('reading a PyTorch checkpoint needs torch: pip install torch '
                      '--index-url https://download.pytorch.org/whl/cpu') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (a cut or damaged file raises almost anything)
    reason, unsafe = _torch_reason(e)
    if not unsafe:
      raise ConfigError(f'cannot read {path}: {reason}') from None
    if not trust_file:
      raise ConfigError(f'refused {path}: torch.load(weights_only=True) cannot read it ({reason}); if you trust the '
                        'file, pass --trust_file, which reads it with weights_only=False and runs any code it '
                        'holds') from None
    warnings.warn(f'{path}: weights_only=True refused the file ({reason}); --trust_file: reading it with '
                  'weights_only=False, which runs the code its pickle names', stacklevel=2)
    try:
      obj = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e2:  # pylint: disable=broad-except
      raise ConfigError(f'cannot read {path} (--trust_file): {_torch_reason(e2)[0]}') from None
  return {k: _to_numpy(v) for k, v in extract_state_dict(obj).items()}


# ------------------------------------------------------------------------------------------------------------- CLI


def prepare_output(out_dir: str, overwrite: bool):
  """Refuses an `out_dir` that already holds a checkpoint (or clears it with `overwrite`), or that is not a folder,
  before anything is read."""
  for where in (out_dir, ckpt_lib.directory(out_dir)):
    if os.path.exists(where) and not os.path.isdir(where):
      raise ConfigError(f'output directory {out_dir}: {where} exists and is not a directory')
  target = ckpt_lib.directory(out_dir)
  if os.path.isdir(target) and os.listdir(target):
    if not overwrite:
      raise ConfigError(f'{target} already holds a checkpoint; choose another output directory or pass --overwrite')
    shutil.rmtree(target)


def save_import(out_dir: str, variables: dict, model: str, model_kwargs: dict, dataset: str, image_shape,
                source: str) -> dict:
  """Writes imported variables as a model-only kdjax checkpoint; returns its meta as `read_meta` gives it."""
  meta = {
      'model': model,
      'model_kwargs': model_kwargs,
      'num_classes': int(variables['params']['head']['bias'].shape[0]),
      'dataset': dataset,
      'image_shape': list(image_shape),
      'epoch': 0,
      'total_steps': 0,
      'imported_from': os.path.abspath(source),
  }
  ckpt_lib.save_model(out_dir, variables, meta)
  return dict(meta, step=0, complete=True)


def check_sizes(image_size: int, num_classes: int | None):
  """The importers' size arguments, before anything is read or written."""
  if image_size < 1:
    raise ConfigError(f'--image_size must be >= 1, got {image_size}')
  if num_classes is not None and num_classes < 1:
    raise ConfigError(f'--num_classes must be >= 1, got {num_classes}')


def import_checkpoint(torch_path: str, out_dir: str, model: str, num_classes: int | None = None,
                      dataset: str = 'cifar100', image_size: int = 32, overwrite: bool = False,
                      trust_file: bool = False) -> dict:
  """Reads `torch_path`, converts it for `model` and writes a model-only kdjax checkpoint to `out_dir`.

  `trust_file`: see `load_state_dict`. Returns the meta written next to the variables.
  """
  check_sizes(image_size, num_classes)
  prepare_output(out_dir, overwrite)
  image_shape = [image_size, image_size, 3]
  variables = convert(load_state_dict(torch_path, trust_file), model, num_classes, image_shape)
  return save_import(out_dir, variables, model, {}, dataset, image_shape, torch_path)


def import_extras(torch_path: str, out_dir: str, method: str, overwrite: bool = False,
                  trust_file: bool = False) -> dict:
  """Reads the reference's state_dict of `method`'s extra module (`torch_extras.RULES`) and writes it to `out_dir`
  as what `config.distill.extras_checkpoint` reads. Returns the meta written."""
  from kdjax.tools import torch_extras
  torch_extras.rule_of(method)  # an unknown method: refused before anything is read or written
  prepare_output(out_dir, overwrite)
  variables = torch_extras.convert(load_state_dict(torch_path, trust_file), method)
  meta = {'extras': [method], 'epoch': 0, 'total_steps': 0, 'imported_from': os.path.abspath(torch_path)}
  ckpt_lib.save_model(out_dir, None, meta, extras=torch_extras.as_extras(variables, method))
  return dict(meta, step=0, complete=True)


def weights_file_main(prog: str, doc: str, choices, importer, argv=None, note: str = '') -> int:
  """The command line of an importer of weight files of fixed architectures (import_keras, import_bit):
  `importer(weights, out_dir, model, num_classes, dataset, image_size, overwrite)` -> meta; `note` follows the
  success line."""
  parser = argparse.ArgumentParser(prog=prog, description=doc.split('\n')[0])
  parser.add_argument('--model', required=True, choices=choices)
  parser.add_argument('--num_classes', type=int, default=None, help="default: the width of the file's classifier")
  parser.add_argument('--dataset', default='imagenet2012', help='dataset the weights were trained on (in the meta)')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--overwrite', action='store_true')
  parser.add_argument('weights')
  parser.add_argument('out_dir')
  args = parser.parse_args(argv)
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    meta = importer(args.weights, args.out_dir, args.model, args.num_classes, args.dataset, args.image_size,
                    args.overwrite)
  except (KDError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'imported {args.weights} as {meta["model"]} ({meta["num_classes"]} classes, {meta["dataset"]}) into '
        f'{args.out_dir}{note}')
  return 0


def _quiet_orbax(record) -> bool:
  # Orbax warns that a model-only save has no metrics for its best-checkpoint policy: expected here, not news.
  return record.levelno >= logging.ERROR or '/orbax/' not in record.pathname.replace(os.sep, '/')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m kdjax.tools.import_torch',
      description='Convert a PyTorch state_dict (a RepDistiller / SimKD / mdistiller CIFAR model, a torchvision '
                  'ImageNet model, a timm / DeiT ViT; .pth or .safetensors) into a kdjax checkpoint directory '
                  'usable as config.teacher.checkpoint.')
  parser.add_argument('checkpoint', help='the .pth file ({"model": sd}, {"net": sd} or a bare state_dict) or a '
                                         '.safetensors file')
  parser.add_argument('out_dir', help='output workdir; the checkpoint goes to OUT_DIR/checkpoints')
  parser.add_argument('--model', help='kdjax model name, e.g. resnet32x4, wrn_40_2, ShuffleV2')
  parser.add_argument('--extras', metavar='METHOD',
                      help='instead of a model: the state_dict of METHOD\'s extra module (fitnet: RepDistiller\'s '
                           'ConvReg; crd: its CRDLoss embeddings), for config.distill.extras_checkpoint')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='classes of the classifier (default: read from the state_dict)')
  parser.add_argument('--dataset', default='cifar100', help='dataset the teacher was trained on (recorded in meta)')
  parser.add_argument('--image_size', type=int, default=32, help='input height = width (default 32)')
  parser.add_argument('--overwrite', action='store_true', help='replace a checkpoint already in OUT_DIR')
  parser.add_argument('--trust_file', action='store_true',
                      help='read a file that torch.load(weights_only=True) refuses (one that pickles other objects '
                           'than tensors, e.g. an argparse.Namespace) with weights_only=False: this RUNS CODE FROM THE '
                           'FILE; pass it only for a file from a source you trust')
  args = parser.parse_args(argv)
  logger = logging.getLogger('absl')
  if _quiet_orbax not in logger.filters:
    logger.addFilter(_quiet_orbax)
  if bool(args.model) == bool(args.extras):
    parser.error('give one of --model (a network) or --extras METHOD (a method\'s extra module)')
  try:
    if args.extras:
      import_extras(args.checkpoint, args.out_dir, args.extras, args.overwrite, args.trust_file)
      print(f'imported {args.checkpoint} as the {args.extras} extra module into {ckpt_lib.directory(args.out_dir)}')
      return 0
    meta = import_checkpoint(args.checkpoint, args.out_dir, args.model, args.num_classes, args.dataset,
                             args.image_size, args.overwrite, args.trust_file)
  except KDError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'imported {args.checkpoint} as {meta["model"]} ({meta["num_classes"]} classes, {meta["dataset"]}) into '
        f'{ckpt_lib.directory(args.out_dir)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
