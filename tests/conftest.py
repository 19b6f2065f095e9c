"""Shared test configuration: warnings are errors (pyproject), explicit keys."""

import os
import zlib

import jax
import numpy as np
import pytest

# Float64 stays off, as for users; tests that need it enable it locally.
jax.config.update("jax_enable_x64", False)
# One CPU device, whatever an in-process experiment's CLI would choose
# (qjax.sweep.cpu_devices); multi-device runs are tested in subprocesses.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  jax.config.update("jax_num_cpu_devices", 1)


@pytest.fixture
def seed(request) -> int:
  """A seed derived from the test name, shown in the test id on failure."""
  return zlib.crc32(request.node.name.encode()) % (2**31)


@pytest.fixture
def key(seed):
  return jax.random.key(seed)


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def fast_compile():
  """Smoke runs are compile-bound on CPU: skip XLA's optimizations for a
  module (``pytestmark = pytest.mark.usefixtures("fast_compile")``)."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def small_digits():
  """The first 512 training examples of scikit-learn's 8x8 digits (all of
  its test set): the engine tests' dataset, loaded once per session."""
  from qjax import data
  ds = data.load("digits")
  return ds._replace(train_x=ds.train_x[:512], train_y=ds.train_y[:512])


def pytest_report_header(config):
  return (f"jax {jax.__version__}, devices: {jax.devices()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
