"""Real learning on real data: an MLP on a stratified subset of Fashion-MNIST (Debian's dataset-fashion-mnist).

The bound fails when the loss, the normalisation or the labels are broken: checked once by breaking each on purpose
(labels permuted: 0.14; raw 0..255 pixels fed unnormalised: 0.10; the cross-entropy's sign flipped: the run
diverges and stops), against 0.81 for the intact pipeline (3 epochs, 6,000 training images, 2 CPU cores, ~20 s).
"""

import pytest

from kdjax import train
from tests.util import digits_config, real_data


@pytest.mark.slow
def test_mlp_learns_real_fashion_mnist(tmp_path):
  real_data()
  cfg = digits_config('mlp', epochs=3)
  cfg.student.kwargs = {'hidden': (64,)}
  cfg.data.update(name='fashion_mnist', train_examples=6000, test_examples=2000)
  cfg.figures = False
  summary = train.run(cfg, str(tmp_path))
  ds = summary.trainer.ds
  assert len(ds.train) == 6000 and len(ds.test) == 2000 and ds.image_shape == (28, 28, 1)
  assert summary['test_accuracy'] >= 0.75


def test_real_data_returns_the_path_when_it_exists(tmp_path, monkeypatch):
  for ci in ('true', ''):
    monkeypatch.setenv('CI', ci)
    assert real_data(str(tmp_path), 'some-package') == str(tmp_path)


def test_missing_real_data_skips_naming_the_package_outside_ci(tmp_path, monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  with pytest.raises(pytest.skip.Exception, match='apt-get install some-package'):
    real_data(str(tmp_path / 'missing'), 'some-package')


def test_missing_real_data_fails_under_ci(tmp_path, monkeypatch):
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(pytest.fail.Exception, match='missing.*some-package.*CI=true'):
    real_data(str(tmp_path / 'missing'), 'some-package')
  monkeypatch.setenv('CI', 'TRUE')
  with pytest.raises(pytest.fail.Exception):
    real_data(str(tmp_path / 'missing'))
