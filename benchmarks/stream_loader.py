r"""kdjax's streaming loader end to end (kdjax/data/stream.py `TrainLoader`): images/s of whole host batches of
224x224 random-resized crops, read from a generated ImageFolder of ImageNet-sized JPEGs (benchmarks/input_pipeline.py
`make_images`: about 110 kB each), with 0, 1, 2, ... Grain worker processes; wall time, after the first batch (the
workers' start, printed too). The device transfer and the step are not included: this is what the host can feed.

  python benchmarks/stream_loader.py [--n=192] [--batch=32] [--workers=0,1,2] [--seconds=15]
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=192, help='training JPEGs (2 classes)')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--seconds', type=float, default=15.0)
  a = p.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from input_pipeline import make_images
  from kdjax import config_lib
  from kdjax.data import stream
  root = tempfile.mkdtemp(prefix='kdjax_stream_bench_')
  for i, data in enumerate(make_images(a.n, 0, False)):
    for split in ('train',) + (('val',) if i < 8 else ()):
      folder = os.path.join(root, split, f'c{i % 2}')
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
        f.write(data)
  c = config_lib.base()
  c.data.update(name='folder', dir=root, pipeline='stream')
  for workers in [int(w) for w in a.workers.split(',')]:
    c.data.workers = workers
    ds = stream.load(c.data)
    t0 = time.time()
    loader = stream.TrainLoader(ds, a.batch, seed=0)
    loader.next_local()
    t1, n = time.time(), 0
    while time.time() - t1 < a.seconds:
      loader.next_local()
      n += a.batch
    rate = n / (time.time() - t1)
    loader.close()
    print(f'workers={workers}: first batch {t1 - t0:.1f} s, then {rate:.0f} img/s (batch {a.batch}, '
          f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})', flush=True)


if __name__ == '__main__':
  main()
