"""Reliability of the input files, the datasets and the tools (issue 22): no code run from a data or weight file, no
hang on a stream of corrupt images, no symlink loop counted over and over, a damaged decoded-data cache set aside
and rebuilt, and every bad file or argument refused in one line with nothing written. Tiny files in tmp_path, no
training runs."""

import gzip
import logging
import os
import pickle
import shlex
import struct
import threading

import numpy as np
import pytest
from PIL import Image

from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import errors
from kdjax.data import stream


def _cfg(name, root, tmp_path, **kw):
  c = config_lib.base().data
  c.update(name=name, dir=str(root), cache_dir=str(tmp_path / 'cache'))
  folder_kw = {k[len('folder_'):]: kw.pop(k) for k in list(kw) if k.startswith('folder_')}
  c.update(kw)
  c.folder.update(folder_kw)
  return c


def _png_folder(root, classes=('a', 'b'), per_class=4, size=(6, 5), seed=0):
  rng = np.random.default_rng(seed)
  for name in classes:
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / name / f'{i:03d}.png')
  return root


def _refused(cfg, error=errors.KDError) -> str:
  """The one-line message `data.load(cfg)` refuses `cfg` with."""
  with pytest.raises(error) as e:
    data_lib.load(cfg)
  message = str(e.value)
  assert message and '\n' not in message, message
  return message


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


# ------------------------------------------------------------------------------------ code run from input files

class _RunsCode:
  """What a crafted pickle holds: unpickling it calls os.system, which writes `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {shlex.quote(str(self.marker))}',)


def _cifar10_real_format(where, rng, per_batch=3, n_test=2):
  """cifar-10-batches-py as torchvision's download holds it: dicts whose b'data' is a NumPy uint8 array [N, 3072],
  b'labels' and b'filenames' lists, pickled by NumPy 1 (its arrays name numpy.core.multiarray._reconstruct)."""
  where.mkdir(parents=True)
  rows = {}
  for name, n in [(f'data_batch_{i}', per_batch) for i in range(1, 6)] + [('test_batch', n_test)]:
    rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    d = {b'batch_label': name.encode(), b'labels': [int(x) for x in rng.integers(0, 10, n)], b'data': rows[name],
         b'filenames': [f'{name}_{i}.png'.encode() for i in range(n)]}
    raw = pickle.dumps(d, protocol=2).replace(b'cnumpy._core.multiarray\n_reconstruct\n',
                                              b'cnumpy.core.multiarray\n_reconstruct\n')
    assert b'cnumpy.core.multiarray\n_reconstruct\n' in raw
    (where / name).write_bytes(raw)
  names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
  (where / 'batches.meta').write_bytes(pickle.dumps({b'num_cases_per_batch': per_batch, b'label_names': names,
                                                     b'num_vis': 3072}, protocol=2))
  return rows


def test_cifar_pickles_load_only_what_the_format_holds(tmp_path):
  rng = np.random.default_rng(0)
  where = tmp_path / 'cifar-10-batches-py'
  rows = _cifar10_real_format(where, rng)
  ds = data_lib.load(_cfg('cifar10', tmp_path, tmp_path))
  train_rows = np.concatenate([rows[f'data_batch_{i}'] for i in range(1, 6)])
  np.testing.assert_array_equal(ds.train.images, train_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  assert ds.num_classes == 10 and len(ds.test) == 2

  marker = tmp_path / 'marker'
  for name, obj in (('data_batch_3', _RunsCode(marker)), ('batches.meta', {b'label_names': [_RunsCode(marker)]})):
    good = (where / name).read_bytes()
    (where / name).write_bytes(pickle.dumps(obj, protocol=2))
    message = _refused(_cfg('cifar10', tmp_path, tmp_path / name), errors.ConfigError)
    assert message.startswith(f'refused {where / name}: it names posix.system,'), message
    assert not marker.exists()  # the reduce never ran
    assert not (tmp_path / name / 'cache').exists()
    (where / name).write_bytes(good)


def test_import_torch_never_falls_back_to_unsafe_loading(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  import argparse
  from kdjax.tools import import_torch

  state = {'fc.weight': torch.ones(2, 3), 'fc.bias': torch.zeros(2)}
  namespace = tmp_path / 'repdistiller.pth'  # RepDistiller's files also pickle the run's argparse options
  torch.save({'model': state, 'opt': argparse.Namespace(lr=0.05)}, namespace)
  marker = tmp_path / 'marker'
  crafted = tmp_path / 'crafted.pth'
  torch.save({'model': state, 'x': _RunsCode(marker)}, crafted)
  for path, names in ((namespace, 'argparse.Namespace'), (crafted, 'posix.system')):
    out = tmp_path / f'out_{path.stem}'
    assert import_torch.main(['--model', 'resnet8x4', str(path), str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f'error: refused {path}: ') and names in line and '--trust_file' in line, line
    assert not marker.exists() and not out.exists()
  # Only when asked for: the flag reads such a file, and its help says that this runs code from the file.
  with pytest.warns(UserWarning, match='--trust_file: reading it with weights_only=False'):
    loaded = import_torch.load_state_dict(str(namespace), trust_file=True)
  np.testing.assert_array_equal(loaded['fc.weight'], np.ones((2, 3)))
  with pytest.raises(SystemExit):
    import_torch.main(['--help'])
  assert 'RUNS CODE FROM THE FILE' in ' '.join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------------------- hangs

def test_a_stream_of_only_corrupt_images_stops_in_one_line(tmp_path):
  from kdjax.tools import jpeg_folder
  root = jpeg_folder.write(str(tmp_path / 'jpegs'), 2, 3, 1, side=12)
  for parent, _, names in os.walk(os.path.join(root, 'train')):
    for name in names:
      with open(os.path.join(parent, name), 'wb') as f:
        f.write(b'not a jpeg')
  c = config_lib.base().data
  c.update(name='folder', dir=root, pipeline='stream', image_size=8, resize=10, on_corrupt='skip')
  loader = stream.TrainLoader(stream.load(c), 4, seed=0)
  outcome = []

  def take():
    try:
      loader.next_local()
    except Exception as e:  # pylint: disable=broad-except  (recorded, checked below)
      outcome.append(e)

  taker = threading.Thread(target=take, daemon=True)
  taker.start()
  taker.join(timeout=120)
  try:
    assert not taker.is_alive(), 'next_local() still looking for a readable image after 120 s'
    (error,) = outcome
    assert isinstance(error, errors.ConfigError) and '\n' not in str(error)
    assert str(error).startswith(f'12 corrupt training images in a row in {root} train (of 6), none readable'), error
  finally:
    loader.close()


# --------------------------------------------------------------------------------------------------- symlinks

def test_symlinks_back_into_the_tree_are_not_followed(tmp_path, caplog):
  root = _png_folder(tmp_path / 'data')
  os.symlink('..', root / 'a' / 'up')  # a/up/a/up/... : a loop that reaches both classes again
  os.symlink(root / 'b', root / 'a' / 'b_again')
  outside = _png_folder(tmp_path / 'outside', classes=('more',), per_class=2, seed=1) / 'more'
  os.symlink(outside, root / 'b' / 'more')  # a folder outside the tree is followed, once
  os.symlink('.', outside / 'self')
  with caplog.at_level(logging.WARNING):
    ds = data_lib.load(_cfg('folder', root, tmp_path, folder_test_fraction=0.25))
  assert (len(ds.train), len(ds.test)) == (7, 3)  # 4 + 6 images, not 8 counted as 168
  assert np.bincount(np.concatenate([ds.train.labels, ds.test.labels])).tolist() == [4, 6]
  assert 'not following the symlink' in caplog.text and str(root / 'a' / 'up') in caplog.text


# ------------------------------------------------------------------------------------------------------ caches

def _npz_members(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_a_damaged_decoded_data_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
  root = _png_folder(tmp_path / 'data')
  cfg = _cfg('folder', root, tmp_path)
  first = data_lib.load(cfg)
  (entry,) = [os.path.join(d, 'train.npz') for d in (tmp_path / 'cache').iterdir()]
  intact, intact_members = open(entry, 'rb').read(), _npz_members(entry)

  def damage_is_repaired(how):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = data_lib.load(cfg)
    np.testing.assert_array_equal(again.train.images, first.train.images)
    np.testing.assert_array_equal(again.train.labels, first.train.labels)
    aside = [p for p in os.listdir(os.path.dirname(entry)) if p.startswith('train.npz.damaged-')]
    assert len(aside) == 1, aside
    assert f'the cached dataset {entry} is damaged' in caplog.text and how in caplog.text, caplog.text
    os.remove(os.path.join(os.path.dirname(entry), aside[0]))
    rebuilt = _npz_members(entry)  # the same arrays and checksum
    assert sorted(rebuilt) == ['images', 'labels', 'sha256']
    for k, v in intact_members.items():
      np.testing.assert_array_equal(rebuilt[k], v)

  with open(entry, 'wb') as f:  # cut short: not a zip any more
    f.write(intact[:len(intact) // 2])
  damage_is_repaired('BadZipFile')
  members = _npz_members(entry)  # a changed pixel under the stored checksum (a valid zip, CRCs and all)
  members['images'][0, 0, 0, 0] ^= 1
  np.savez(entry, **members)
  damage_is_repaired('do not match their SHA-256')
  # A cache without a checksum (an older kdjax wrote it): decoded again and rewritten with one, nothing set aside.
  np.savez(entry, images=intact_members['images'], labels=intact_members['labels'])
  again = data_lib.load(cfg)
  np.testing.assert_array_equal(again.train.images, first.train.images)
  rewritten = _npz_members(entry)  # decoded again: the cache written anew, its checksum the intact one's
  assert sorted(rewritten) == ['images', 'labels', 'sha256']
  assert str(rewritten['sha256']) == str(intact_members['sha256'])
  assert not [p for p in os.listdir(os.path.dirname(entry)) if '.damaged-' in p]


# --------------------------------------------------------------------------------- bad files: one line each

def _idx(path, dims, payload):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(struct.pack('>I', 0x800 | len(dims)) + struct.pack(f'>{len(dims)}i', *dims) + payload)


def _case_test_fraction(tmp_path):
  return _cfg('folder', _png_folder(tmp_path / 'data'), tmp_path, folder_test_fraction=1.5), \
      'config.data.folder.test_fraction must be in (0, 1), got 1.5'


def _case_single_image_class(tmp_path):
  root = _png_folder(tmp_path / 'data', classes=('a', 'b', 'c'))
  for i in (1, 2, 3):
    os.remove(root / 'c' / f'{i:03d}.png')
  return _cfg('folder', root, tmp_path), f"split of {root}: class 'c' has a single example"


def _case_csv_not_utf8(tmp_path):
  root = tmp_path / 'data'
  (root / 'images').mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / 'images' / f'{i}.png')
  lines = [b'Image Name,Label'] + [f'{i}.png,'.encode() + (b'caf\xe9' if i % 2 else b'tea') for i in range(4)]
  (root / 'annotations.csv').write_bytes(b'\n'.join(lines) + b'\n')
  return _cfg('folder', root, tmp_path), f'{root / "annotations.csv"} is not UTF-8 text (byte 0xe9 at offset'


def _case_dangling_symlink(tmp_path):
  root = _png_folder(tmp_path / 'data')
  os.symlink(tmp_path / 'gone.png', root / 'a' / 'zz.png')
  return _cfg('folder', root, tmp_path), f'dangling symlink {root / "a" / "zz.png"} -> {tmp_path / "gone.png"}'


def _case_decompression_bomb(tmp_path, monkeypatch):
  root = _png_folder(tmp_path / 'data')
  Image.new('L', (40, 40)).save(root / 'a' / 'bomb.png')  # 1,600 pixels, past 2 x the limit set below
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 500)
  return _cfg('folder', root, tmp_path), f'corrupt file {root / "a" / "bomb.png"}: Image size (1600 pixels) exceeds'


def _case_idx_negative_sizes(tmp_path):
  root = tmp_path / 'mnist'
  for prefix, n in (('train', 3), ('t10k', 2)):
    _idx(root / f'{prefix}-images-idx3-ubyte.gz', (n, 28, 28), bytes(n * 784))
    _idx(root / f'{prefix}-labels-idx1-ubyte.gz', (n,), bytes(range(n)))
  for name in os.listdir(root):  # gzipped, as torchvision keeps them
    (root / name).write_bytes(gzip.compress((root / name).read_bytes()))
  bad = root / 'train-images-idx3-ubyte.gz'
  _idx(tmp_path / 'raw', (3, -28, -28), bytes(3 * 784))
  bad.write_bytes(gzip.compress((tmp_path / 'raw').read_bytes()))
  return _cfg('mnist', root, tmp_path), f'corrupt file {bad}: its IDX header gives the sizes 3 x -28 x -28'


def _case_cifar_meta_shape(tmp_path):
  where = tmp_path / 'cifar-10-batches-py'
  _cifar10_real_format(where, np.random.default_rng(1))
  (where / 'batches.meta').write_bytes(pickle.dumps({b'label_names': 10}, protocol=2))
  return _cfg('cifar10', tmp_path, tmp_path), f"corrupt file {where / 'batches.meta'}: b'label_names' is of type int"


def _case_one_class_folder(tmp_path):
  root = _png_folder(tmp_path / 'data', classes=('only',))
  return _cfg('folder', root, tmp_path), f"the folder dataset {root} has 1 class ('only')"


def _case_one_class_left_after_omitting(tmp_path):
  root = _png_folder(tmp_path / 'data')
  return _cfg('folder', root, tmp_path, omit_class=0), f'the training set of dataset folder ({root}) holds 1 class'


CASES = {f.__name__[len('_case_'):]: f for f in (
    _case_test_fraction, _case_single_image_class, _case_csv_not_utf8, _case_dangling_symlink,
    _case_decompression_bomb, _case_idx_negative_sizes, _case_cifar_meta_shape, _case_one_class_folder,
    _case_one_class_left_after_omitting)}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_data_is_one_line_and_nothing_is_written(case, tmp_path, monkeypatch):
  make = CASES[case]
  cfg, start = make(tmp_path, monkeypatch) if 'monkeypatch' in make.__code__.co_varnames else make(tmp_path)
  message = _refused(cfg)
  assert start in message, message
  assert not (tmp_path / 'cache').exists() or case == 'one_class_left_after_omitting'  # decoded before the omit


# ------------------------------------------------------------------------------------------ the tools' inputs

def _report_workdirs(tmp_path):
  cut = tmp_path / 'cut'  # a run killed while writing its first record
  cut.mkdir()
  (cut / 'metrics.jsonl').write_text('{"epoch": 1, "student": 0, "test_acc')
  binary = tmp_path / 'binary'
  binary.mkdir()
  (binary / 'metrics.jsonl').write_bytes(b'\xff\xfe{"epoch": 1}\n')
  sweep = tmp_path / 'sweep'
  sweep.mkdir()
  (sweep / 'sweep.json').write_text('{"students": [3]}')
  bad_epoch = tmp_path / 'bad_epoch'
  bad_epoch.mkdir()
  (bad_epoch / 'metrics.jsonl').write_text('{"epoch": "one", "test_accuracy": 0.5}\n{"epoch": 2}\n')
  return {cut: 'holds no complete epoch record yet', binary: 'is not UTF-8 text',
          sweep: 'student 0 is not an object', bad_epoch: 'is not an epoch record',
          tmp_path / 'missing': 'does not exist'}


def test_the_report_tool_refuses_missing_or_half_written_workdirs_in_one_line(tmp_path, capsys):
  from kdjax.tools import report
  for workdir, reason in _report_workdirs(tmp_path).items():
    before = sorted(os.listdir(workdir)) if workdir.exists() else None
    assert report.main([str(workdir)]) == 2, workdir
    line = _one_error_line(capsys)
    assert str(workdir) in line and reason in line, line
    assert (sorted(os.listdir(workdir)) if workdir.exists() else None) == before  # no results.csv, no figures


def test_tool_files_and_arguments_are_one_line_with_nothing_written(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  from kdjax.tools import import_keras, import_torch, jpeg_folder

  text = tmp_path / 'notes.txt'
  text.write_text('not weights\n')
  npy = tmp_path / 'weights.npy'
  np.save(npy, np.zeros(3))
  good = tmp_path / 'good.pth'
  torch.save({'fc.weight': torch.ones(2, 3)}, good)
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  out = tmp_path / 'out'
  torch_model = ['--model', 'resnet8x4', '--num_classes', '2']
  runs = [
      (import_torch.main, torch_model + [str(text), str(out)], f'{text} is not a PyTorch checkpoint'),
      (import_torch.main, torch_model + [str(npy), str(out)], f'{npy} is not a PyTorch checkpoint: a NumPy .npy'),
      (import_torch.main, torch_model + [str(cut), str(out)], f'cannot read {cut}: '),
      (import_torch.main, torch_model + [str(good), str(a_file)], f'{a_file} exists and is not a directory'),
      (import_torch.main, torch_model + ['--image_size', '0', str(good), str(out)], '--image_size must be >= 1'),
      (import_keras.main, ['--model', 'mobilenetv2_imagenet', str(text), str(out)], f'{text} is not an HDF5 file'),
      (jpeg_folder.main, [str(out), '--side', '0'], '--side must be >= 1, got 0'),
  ]
  for main, argv, start in runs:
    assert main(argv) == 2, argv
    line = _one_error_line(capsys)
    assert start in line, (argv, line)
    assert not out.exists() and a_file.read_text() == '', argv
