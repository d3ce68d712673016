"""The reference's extra modules of a KD method, from a PyTorch state_dict to the variables of kdjax's module
(`params['extras'][method]` and its non-trained collections), for `config.distill.extras_checkpoint`.

  python -m kdjax.tools.import_torch --extras fitnet regressor.pth runs/fitnet_regressor

Accepted: RepDistiller's FitNet regressor (models/util.py `ConvReg`: `conv`, `bn`; kdjax's `regressor`) and CRD's
embedding heads (crd/criterion.py `CRDLoss`: `embed_s.linear`, `embed_t.linear`; kdjax's `embed_s`, `embed_t`). A
`CRDLoss` state_dict's memory banks (`contrast.*`) are not taken: they hold one row per training example of the
reference's data order, and start fresh. The layouts are the model importer's (Conv2d and ConvTranspose2d weights
-> HWIO kernels, Linear -> [in, out], BatchNorm -> scale/bias and batch_stats mean/var); the shapes are checked
against the run's module when a run reads the file (`kdjax.extras_init`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from kdjax.errors import CheckpointMismatchError, ConfigError


@dataclasses.dataclass(frozen=True)
class ExtrasRule:
  """`modules`: the reference's module paths that map to kdjax's (dotted -> tuple of our names). `skipped`: key
  prefixes left out (state that does not carry over)."""
  modules: Mapping[str, tuple[str, ...]]
  skipped: tuple[str, ...] = ()


RULES = {
    'fitnet': ExtrasRule({'conv': ('regressor', 'conv'), 'bn': ('regressor', 'bn')}),
    'crd': ExtrasRule({'embed_s.linear': ('embed_s',), 'embed_t.linear': ('embed_t',)}, skipped=('contrast.',)),
}
_DROPPED = ('.num_batches_tracked',)


def _leaf(key: str, leaf: str, shape: tuple[int, ...]):
  """(collection, our leaf name, transpose from PyTorch layout to ours) of a tensor."""
  if leaf == 'weight':
    if len(shape) == 4:  # Conv2d [O, I, kh, kw] (ConvTranspose2d [I, O, kh, kw]) -> [kh, kw, I, O] ([kh, kw, O, I])
      return 'params', 'kernel', (2, 3, 1, 0)
    if len(shape) == 2:  # Linear [out, in] -> [in, out]
      return 'params', 'kernel', (1, 0)
    if len(shape) == 1:  # BatchNorm
      return 'params', 'scale', None
  names = {'bias': ('params', 'bias'), 'running_mean': ('batch_stats', 'mean'),
           'running_var': ('batch_stats', 'var')}
  if leaf not in names:
    raise CheckpointMismatchError(f'state_dict key {key!r} (shape {shape}): no kdjax counterpart for a {leaf!r} '
                                  'tensor')
  return names[leaf] + (None,)


def rule_of(method: str) -> ExtrasRule:
  if method not in RULES:
    raise ConfigError(f'--extras {method}: no reference module rule for it; importable: {", ".join(sorted(RULES))}')
  return RULES[method]


def convert(state_dict: Mapping[str, Any], method: str) -> dict:
  """{'params': ..., 'batch_stats': ...} of `method`'s extra module from the reference's state_dict of it (bare,
  prefix-stripped). A key of no known module is refused in one line, naming it and the known ones."""
  rule = rule_of(method)
  flat = {}
  for key, value in state_dict.items():
    if key.endswith(_DROPPED) or key.startswith(rule.skipped):
      continue
    module, _, leaf = key.rpartition('.')
    if module not in rule.modules:
      raise CheckpointMismatchError(f'state_dict key {key!r} is of no {method} module the reference has (known: '
                                    f'{", ".join(rule.modules)}): the file holds another module')
    array = np.asarray(value, np.float32)
    collection, name, perm = _leaf(key, leaf, array.shape)
    flat[(collection,) + rule.modules[module] + (name,)] = np.ascontiguousarray(
        array if perm is None else np.transpose(array, perm))
  missing = sorted({m for m in rule.modules} - {k.rpartition('.')[0] for k in state_dict})
  if missing:
    raise CheckpointMismatchError(f'state_dict has no {missing[0]}.* tensors, which {method}\'s module needs '
                                  f'(its modules: {", ".join(rule.modules)})')
  return flax.traverse_util.unflatten_dict(flat)


def as_extras(variables: dict, method: str) -> dict:
  """`convert`'s variables where a run keeps them: `checkpoint.save_model(..., extras=)`."""
  return {'params': {method: variables.get('params', {})},
          'state': {c: {method: v} for c, v in variables.items() if c != 'params'}}

