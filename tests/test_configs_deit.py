"""configs/deit.py: DeiT's ImageNet recipe (DeiT-Ti / DeiT-S) and the CIFAR-100 ViT-student recipe build and
validate with the references' settings; their CPU stand-ins (`mock` on TFDS's generated imagenet2012, `digits`)
train a distilled ViT for a few steps and report each head."""

import json

import numpy as np
import pytest

from kdjax import train
from kdjax import validate
from tests.test_configs import load_config
from tests.util import random_teacher


@pytest.mark.parametrize('arg, student, kind', [('tiny', 'deit_tiny_distilled', 'hard'),
                                                ('small', 'deit_small_distilled', 'hard'),
                                                ('', 'deit_tiny_distilled', 'hard')])
def test_imagenet_recipe_is_deits(arg, student, kind):
  c = load_config('deit.py', arg)
  validate.check(c)
  assert (c.student.model, c.data.name, c.data.image_size, c.data.resize) == (student, 'imagenet2012', 224, 256)
  assert (c.epochs, c.batch_size, c.optimizer.name, c.optimizer.weight_decay) == (300, 1024, 'adamw', 0.05)
  assert c.optimizer.lr == pytest.approx(5e-4 * 1024 / 512)
  assert (c.schedule.name, c.schedule.warmup_epochs) == ('cosine', 5)
  assert c.schedule.final_fraction * c.optimizer.lr == pytest.approx(1e-5)
  assert (c.data.mixup.alpha, c.data.cutmix.alpha, c.data.erasing.prob) == (0.8, 1.0, 0.25)
  assert dict(c.data.randaugment) == dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5)
  assert c.data.mixup.mode == c.data.cutmix.mode == 'batch'
  assert c.distill.label_smoothing == 0.1 and dict(c.distill.losses) == {'ce': 0.5, 'deit': 0.5}
  assert (c.distill.deit.kind, c.distill.deit.tau, c.student.kwargs.drop_path_rate) == (kind, 1.0, 0.1)


def test_cifar100_recipe_is_the_references():
  c = load_config('deit.py', 'cifar100')
  validate.check(c)
  assert (c.student.model, c.student.kwargs.patch_size, c.teacher.model) == ('deit_tiny_distilled', 4, 'resnet56')
  assert (c.data.name, c.epochs, c.batch_size, c.optimizer.name) == ('cifar100', 300, 128, 'adamw')
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.schedule.warmup_epochs) == (5e-4, 0.05, 20)
  assert (c.distill.deit.kind, c.distill.deit.tau, c.teacher.image_size) == ('soft', 3.0, 0)  # 0: the data's 32
  assert c.teacher.recipe.optimizer.name == 'sgd' and c.teacher.recipe.epochs == 240


@pytest.mark.parametrize('arg, message', [
    ('tiny,small', 'choose one student size'), ('cifar100,mock', 'its CPU stand-in is digits'),
    ('digits', "digits is the cifar100 recipe's stand-in"), ('base', "unknown config string item 'base'")])
def test_bad_items_are_refused_by_name(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config('deit.py', arg)


def _records(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl') if '"epoch"' in line]


@pytest.mark.slow
def test_mock_runs_the_imagenet_recipe_on_tfds_mock_data(tmp_path):
  """The stream pipeline, mixup/cutmix/erasing and label smoothing on TFDS's generated imagenet2012 (16 images
  of 8 x 8, 1000 classes): the teacher trained first and cached, then two epochs of two steps of hard DeiT
  distillation."""
  import tensorflow_datasets as tfds
  c = load_config('deit.py', 'mock')
  c.teacher.cache_dir = str(tmp_path / 'teachers')
  validate.check(c)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    outcome = train.run(c, str(tmp_path / 'run'))
  records = _records(tmp_path / 'run')
  assert outcome.trainer.steps_per_epoch == 2 and len(records) == 2
  assert all(np.isfinite(r['loss_deit']) and np.isfinite(r['loss_ce']) for r in records)
  s = outcome.summary
  assert s['test_count'] == 16
  for key in ('test_accuracy', 'test_cls_head_accuracy', 'test_dist_head_accuracy', 'test_agreement'):
    assert 0.0 <= s[key] <= 1.0, key


@pytest.mark.slow
def test_cifar100_digits_runs_two_steps(tmp_path):
  """The CIFAR-100 recipe's stand-in: soft DeiT distillation at T 3 from a CNN teacher (a random one here), AdamW
  with warmup; two steps of 64 images."""
  c = load_config('deit.py', 'cifar100,digits')
  c.teacher.checkpoint = random_teacher(str(tmp_path / 'teacher'), 'cnn_small')
  c.data.train_examples, c.epochs, c.schedule.warmup_epochs = 64, 2, 1
  c.eval_every_epochs = c.checkpoint_every_epochs = 2
  c.num_devices = 1
  validate.check(c)
  outcome = train.run(c, str(tmp_path / 'run'))
  assert outcome.trainer.steps_per_epoch == 1
  records = _records(tmp_path / 'run')
  assert len(records) == 2 and all(np.isfinite(r['loss_deit']) for r in records)
  assert records[0]['loss_deit'] > 0.0
  s = outcome.summary
  assert 0.0 <= s['test_dist_head_accuracy'] <= 1.0 and s['test_count'] == 360
