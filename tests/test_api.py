"""The public API imports and every name in __all__ exists."""

import qjax


def test_all_names_exist():
  for name in qjax.__all__:
    assert getattr(qjax, name) is not None, name


def test_subpackages_import():
  from qjax import data, models, sweep, theory, train  # noqa: F401
  assert callable(sweep.sweep) and callable(train.train_step)
