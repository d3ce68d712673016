"""The streaming input pipeline (kdjax/data/stream.py): tiny generated JPEG folders, an MLP, one CPU device.

Every run here shares one program shape (batch 8 of 8x8 crops, resize 10) so the compile cache serves them all."""

import logging
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import trainer as trainer_lib
from kdjax import config_lib
from kdjax import errors
from kdjax import train
from kdjax import validate
from kdjax.data import device as device_data
from kdjax.data import stream
from kdjax.tools import jpeg_folder

TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 8, 4, 3


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
  return jpeg_folder.write(str(tmp_path_factory.mktemp('jpegs')), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, side=12)


def stream_config(root, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.update(name='folder', dir=root, pipeline='stream', image_size=8, resize=10)
  c.student.model, c.student.kwargs = 'mlp', {'hidden': (16,)}
  c.distill.losses = {'ce': 1.0}
  c.epochs, c.batch_size, c.eval_batch_size = 2, 8, 8  # 3 steps per epoch; 12 test images: the last batch half full
  c.optimizer.lr = 0.05
  c.schedule.name = 'cosine'
  c.num_devices = 1
  c.tensorboard = c.figures = False
  for key, value in overrides.items():
    section, _, field = key.rpartition('__')
    (c[section] if section else c)[field] = value
  return c


def _params(summary):
  return jax.tree.map(np.asarray, summary.state.params)


def _interrupt_at_dispatch(monkeypatch, n, action):
  calls = {'n': 0}
  original = trainer_lib.Trainer.train_chunk

  def chunk(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == n:
      action()
    return original(self, ts, epoch, start)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', chunk)


@pytest.fixture(scope='module')
def reference_run(jpegs, tmp_path_factory):
  """An uninterrupted streamed run: 2 epochs of 3 steps, random-resized crops, 2 steps per dispatch (the epoch's
  last step dispatched alone)."""
  cfg = stream_config(jpegs, steps_per_dispatch=2)
  return train.run(cfg, str(tmp_path_factory.mktemp('ref')))


def test_resume_mid_epoch_is_bit_exact(jpegs, reference_run, tmp_path, monkeypatch):
  work = str(tmp_path / 'term')
  # Dispatch 3 is step 3 (the first of epoch 2): SIGTERM there stops after it, at step 5, mid-epoch.
  _interrupt_at_dispatch(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(errors.Preempted):
    train.run(stream_config(jpegs, steps_per_dispatch=2), work)
  assert ckpt_lib.read_meta(work)['step'] == 5
  ckpt = ckpt_lib.open_for_reading(work)
  try:
    assert ckpt.read_data(5) == {'positions': [40]}  # 5 batches of 8 elements of the stream consumed
  finally:
    ckpt.close()
  monkeypatch.undo()
  resumed = train.run(stream_config(jpegs, steps_per_dispatch=2), work)
  jax.tree.map(np.testing.assert_array_equal, _params(reference_run), _params(resumed))
  assert resumed['test_count'] == reference_run['test_count'] == CLASSES * VAL_PER_CLASS

  # A crash in epoch 2: the run restarts from the end-of-epoch-1 checkpoint and its stream position. (An exception:
  # the run's `finally` still runs. SIGKILLs of real processes: tests/test_crash_resume.py.)
  work = str(tmp_path / 'crash')

  def crash():
    raise KeyboardInterrupt

  _interrupt_at_dispatch(monkeypatch, 4, crash)
  with pytest.raises(KeyboardInterrupt):
    train.run(stream_config(jpegs, steps_per_dispatch=2), work)
  assert ckpt_lib.read_meta(work)['step'] == 3
  monkeypatch.undo()
  resumed = train.run(stream_config(jpegs, steps_per_dispatch=2), work)
  jax.tree.map(np.testing.assert_array_equal, _params(reference_run), _params(resumed))


@pytest.mark.slow
def test_rolled_scan_dispatch_matches(jpegs, reference_run, tmp_path):
  # The accelerators' dispatch: K = 2 steps in a rolled lax.scan; the epoch's third step is the first of a
  # dispatch whose second step is masked (its batch zeros), so the stream must not advance past it.
  summary = train.run(stream_config(jpegs, steps_per_dispatch=2, steps_loop='scan'), str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), _params(reference_run),
               _params(summary))


def test_eval_counts_every_example_once(jpegs, reference_run):
  # 12 test images in batches of 8: the second batch is half padding, masked out.
  assert reference_run['test_count'] == CLASSES * VAL_PER_CLASS
  ds = stream.load(stream_config(jpegs).data)
  seen = []
  for index in range(2):  # two processes, each its strided shard, the same number of batches
    batches = list(stream.eval_batches(ds, 'test', 8, process_index=index, process_count=2))
    assert len(batches) == 2 and all(b['images'].shape == (1, 4, 8, 8, 3) for b, _ in batches)
    seen.append(np.concatenate([b['labels'][0][b['mask'][0]] for b, _ in batches]))
  assert sum(len(s) for s in seen) == CLASSES * VAL_PER_CLASS
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(ds.test.source.labels))


def test_shards_are_disjoint_and_cover_each_global_batch(jpegs):
  ds = stream.load(stream_config(jpegs).data)
  whole = stream.TrainLoader(ds, 8, seed=0)
  halves = [stream.TrainLoader(ds, 8, seed=0, process_index=i, process_count=2) for i in range(2)]
  try:
    epoch = []
    for _ in range(3):  # one epoch: every global batch is the single-process batch, split between the processes
      b = whole.next_local()['indices']
      parts = [h.next_local()['indices'] for h in halves]
      assert len(parts[0]) == len(parts[1]) == 4 and not set(parts[0]) & set(parts[1])
      assert set(parts[0]) | set(parts[1]) == set(b)
      epoch += list(b)
    assert sorted(epoch) == list(range(CLASSES * TRAIN_PER_CLASS))  # each training image once per epoch
    second = [whole.next_local()['indices'] for _ in range(3)]
    assert sorted(np.concatenate(second).tolist()) == list(range(CLASSES * TRAIN_PER_CLASS))
    assert np.concatenate(second).tolist() != epoch  # reshuffled
    assert whole.position == 48 and halves[0].position == halves[1].position == 12
  finally:
    for loader in [whole] + halves:
      loader.close()


def test_resume_positions_on_another_process_count():
  state = {'positions': [12, 12]}  # step 3 at batch 8 on 2 processes, nothing skipped
  assert stream.resume_position(state, 3, 8, process_index=1, process_count=2) == 12
  assert stream.resume_position(state, 3, 8, process_index=0, process_count=1) == 24
  assert stream.resume_position(None, 0, 8, process_index=0, process_count=4) == 0
  with pytest.raises(errors.ConfigError, match=r'^the checkpoint at step 3 was streamed by 2 processes and skipped '):
    stream.resume_position({'positions': [13, 12]}, 3, 8, process_index=0, process_count=1)


def test_restart_at_a_position_and_workers_give_the_same_batches(jpegs):
  ds = stream.load(stream_config(jpegs).data)
  first = stream.TrainLoader(ds, 8, seed=3)
  batches = [first.next_local() for _ in range(4)]
  first.close()
  restarted = stream.TrainLoader(ds, 8, seed=3, position=16)  # after two batches
  again = [restarted.next_local() for _ in range(2)]
  restarted.close()
  for a, b in zip(batches[2:], again):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  import dataclasses
  parallel = stream.TrainLoader(dataclasses.replace(ds, workers=2), 8, seed=3)
  try:
    for a in batches:  # the augmentation's rng is the record's (seed, epoch, index), whichever process decodes it
      jax.tree.map(np.testing.assert_array_equal, a, parallel.next_local())
  finally:
    parallel.close()


def test_stream_and_device_paths_train_alike_on_the_same_batches(jpegs):
  """The streamed images equal the device reader's (augment none, crop = image size), and the step fed those
  batches in the device path's order gives the device path's parameters: one _train_step, two batch sources."""
  from kdjax import data as data_lib
  from kdjax import step as step_lib
  dev_cfg = stream_config(jpegs, epochs=1, data__pipeline='device', data__augment='none')
  str_cfg = stream_config(jpegs, epochs=1, data__augment='none', data__image_size=12, data__resize=12)
  ds_dev = data_lib.load(dev_cfg.data)
  import dataclasses
  ds_str = dataclasses.replace(stream.load(str_cfg.data), mean=ds_dev.mean, std=ds_dev.std)
  loader = stream.TrainLoader(ds_str, 8, seed=0)
  try:
    b = loader.next_local()
  finally:
    loader.close()
  np.testing.assert_array_equal(b['images'], ds_dev.train.images[b['indices']])
  np.testing.assert_array_equal(b['labels'], ds_dev.train.labels[b['indices']])

  exp_dev, exp_str = trainer_lib.build(dev_cfg, ds_dev), trainer_lib.build(str_cfg, ds_str)
  ts_dev, ts_str = exp_dev.init_state(), exp_str.init_state()
  perm = np.asarray(device_data.epoch_permutation(exp_dev.source.data_rng, 0, len(ds_dev.train)))

  class Given:  # the device path's batches, handed to the streaming step
    def take(self, steps, pad_to=None):
      idx = perm[self.start * 8:(self.start + steps) * 8].reshape(steps, 8)
      arrays = {'images': ds_dev.train.images[idx], 'labels': ds_dev.train.labels[idx], 'indices': idx}
      return {k: jax.device_put(np.asarray(v), exp_str.source.sharding) for k, v in arrays.items()}

  given = Given()
  exp_str.source.loader = given  # the streaming step reads its batches from the source's loader
  for s in range(exp_dev.steps_per_epoch):
    given.start = s
    ts_dev, m_dev = exp_dev.train_chunk(ts_dev, 0, s)
    ts_str, m_str = exp_str.train_chunk(ts_str, 0, s)
    np.testing.assert_array_equal(m_dev['loss'], m_str['loss'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ts_dev.params), jax.device_get(ts_str.params))
  # A batch in another order is another step: the check can fail.
  given.start, perm = 0, perm[::-1]
  ts_other, _ = exp_str.train_chunk(exp_str.init_state(), 0, 0)
  ts_first, _ = exp_dev.train_chunk(exp_dev.init_state(), 0, 0)
  assert not np.array_equal(jax.device_get(ts_other.params['student']['head']['kernel']),
                            jax.device_get(ts_first.params['student']['head']['kernel']))


@pytest.fixture(scope='module')
def corrupt_jpegs(tmp_path_factory):
  root = jpeg_folder.write(str(tmp_path_factory.mktemp('corrupt')), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, side=12)
  with open(os.path.join(root, 'train', 'c1', 'zz_bad.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  return root


def test_corrupt_jpeg_is_skipped_with_a_count(corrupt_jpegs, tmp_path, caplog):
  ds = stream.load(stream_config(corrupt_jpegs, data__on_corrupt='skip').data)
  paths = [ds.train.source.path(i) for i in range(len(ds.train))]
  bad = paths.index(os.path.join(corrupt_jpegs, 'train', 'c1', 'zz_bad.jpg'))
  loader = stream.TrainLoader(ds, 8, seed=0)
  try:
    batches = [loader.next_local() for _ in range(3)]  # 25 records, 24 readable: 3 full batches
  finally:
    loader.close()
  indices = np.concatenate([b['indices'] for b in batches])
  assert all(len(b['indices']) == 8 for b in batches) and bad not in indices and len(set(indices)) == 24
  assert len(loader.skipped) == 1 and 'zz_bad.jpg' in loader.skipped[0] and loader.position == 25
  with caplog.at_level(logging.WARNING):
    summary = train.run(stream_config(corrupt_jpegs, epochs=1, data__on_corrupt='skip'),
                                       str(tmp_path / 'skip'))
  assert 'epoch 1: 1 corrupt image(s) skipped (data.on_corrupt=skip)' in caplog.text
  assert summary['test_count'] == CLASSES * VAL_PER_CLASS


def test_corrupt_jpeg_stops_with_its_path(corrupt_jpegs):
  ds = stream.load(stream_config(corrupt_jpegs).data)  # data.on_corrupt = 'stop', the default
  loader = stream.TrainLoader(ds, 8, seed=0)
  try:
    with pytest.raises(errors.ConfigError, match=r"^corrupt image .*zz_bad\.jpg: .*on_corrupt=skip"):
      for _ in range(4):
        loader.next_local()
  finally:
    loader.close()


def test_empty_class_folder_is_one_line(tmp_path):
  root = jpeg_folder.write(str(tmp_path / 'f'), 2, 2, 1, side=12)
  os.makedirs(os.path.join(root, 'train', 'c2'))
  with pytest.raises(errors.DatasetNotFoundError, match=r"^class folder .*c2 holds no images \("):
    stream.load(stream_config(root).data)


@pytest.mark.parametrize('field, value, message', [
    ('data.pipeline', 'disk', r"^config.data.pipeline must be one of 'auto', 'device', 'stream', got 'disk'$"),
    ('data.on_corrupt', 'ignore', r"^config.data.on_corrupt must be one of 'stop', 'skip', got 'ignore'$"),
    ('data.workers', -1, r'^config.data.workers must be >= 0, got -1$'),
    ('data.resize', 6, r'^config.data.resize=6 is smaller than config.data.image_size=8 '),
    ('data.name', 'cifar10', r"^config.data.pipeline='stream' reads imagenet2012 or folder, not cifar10; "),
    ('data.val_fraction', 0.1, r'^config.data.val_fraction is not supported: '),
    ('distill.losses', {'ce': 0.1, 'ce_strong': 0.1, 'mlkd': 0.9}, r"^config.distill.losses: mlkd's strong view "),
])
def test_bad_fields_are_one_line(jpegs, field, value, message):
  cfg = stream_config(jpegs)
  if field == 'distill.losses':
    cfg.teacher.model = 'mlp'
  section, name = field.split('.')
  cfg[section][name] = value
  with pytest.raises(errors.ConfigError, match=message):
    validate.check(cfg)


def test_device_pipeline_refuses_imagenet():
  cfg = config_lib.base()
  cfg.data.update(name='imagenet2012', pipeline='device')
  with pytest.raises(errors.ConfigError, match=r"^config.data.pipeline='device' cannot hold imagenet2012"):
    validate.check(cfg)


def test_auto_pipeline(jpegs):
  data = stream_config(jpegs, data__pipeline='auto').data
  assert stream.choose(data) == 'device'  # 24 small images
  data.device_budget_gb = 1e-9
  assert stream.choose(data) == 'stream'
  data.name = 'imagenet2012'
  assert stream.choose(data) == 'stream'
  data.name = 'digits'
  assert stream.choose(data) == 'device'


@pytest.mark.slow
def test_imagenet_mock_config_runs(jpegs, tmp_path):
  """configs/imagenet.py:mock end to end: a teacher trained first on the streamed folder, then KD from it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('imagenet_config', os.path.join(
      os.path.dirname(__file__), '..', 'configs', 'imagenet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config('mock')
  # The suite's shapes (8x8 crops of 12x12 images), so that the programs are the ones compiled above.
  cfg.data.update(dir=jpegs, image_size=8, resize=10)
  cfg.teacher.cache_dir = str(tmp_path / 'teachers')
  summary = train.run(cfg, str(tmp_path / 'run'))
  assert summary['test_count'] == CLASSES * VAL_PER_CLASS
  # The classes differ in mean colour: one epoch of the teacher then the student already beats chance (1/3; 8 of 12
  # measured), and the student follows its teacher (agreement 1.0 measured).
  assert summary['test_accuracy'] >= 0.5 and summary['test_agreement'] >= 0.75
  for name in ('kd', 'dkd', 'dist'):
    for pair in module.PAIRS:
      c = module.get_config(f'{name},{pair[0]},{pair[1]}')
      validate.check(c)
      assert (c.epochs, c.batch_size, c.optimizer.lr, c.dtype, c.data.pipeline) == (100, 512, 0.2, 'bfloat16',
                                                                                     'stream')


@pytest.mark.slow
@pytest.mark.parametrize('arg', ['dkd,resnet34_imagenet,resnet18_imagenet',
                                 'dist,resnet50_imagenet,mobilenetv1_imagenet'])
def test_imagenet_configs_trace(arg):
  """The recipes' step traces on a streamed 224x224 dataset of 1000 classes (abstract values: nothing compiled)."""
  import jax.numpy as jnp
  from kdjax import models
  from kdjax import step as step_lib
  from tests.test_configs import load_config
  cfg = load_config('imagenet.py', arg)
  cfg.batch_size, cfg.num_devices = 8, 1
  split = lambda: stream.Records(stream.FolderSource(['x.jpg'] * 64, np.zeros(64, np.int32)), 224, 'synthetic')
  ds = stream.StreamDataset('imagenet2012', 1000, split(), split(), None, stream.IMAGENET_MEAN, stream.IMAGENET_STD,
                            'random_resized_crop')
  teacher = models.create(cfg.teacher.model, 1000, dtype=jnp.bfloat16)
  teacher_vars = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  exp = trainer_lib.build(cfg, ds, None, teacher, teacher_vars)
  assert exp.source.streaming and exp.teacher_table is None
  ts, metrics = exp.trace_train_step()
  assert ts.params['student'] and set(metrics) >= {'loss', f'loss_{arg.split(",")[0]}'}


@pytest.mark.slow
def test_tfds_imagenet_streams(tmp_path):
  import tensorflow_datasets as tfds
  cfg = stream_config('', epochs=1)
  cfg.data.update(name='imagenet2012', dir='')
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = stream.load(cfg.data)
    assert ds.num_classes == 1000 and len(ds.train) == 16 and ds.image_shape == (8, 8, 3)
    summary = train.run(cfg, str(tmp_path))
  assert summary['test_count'] == 16
