"""Float64 NumPy references, written independently of jaxnorm's implementation.

They use the textbook two-pass formulas in float64, on the same (rounded) input values that the
code under test receives. :func:`import_torch` brings in PyTorch, the other independent
reference, for the tests that compare with it.
"""
import os

import numpy as np
import pytest

TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2, "float64": 1e-10}


def mask_of(where, shape):
  if where is None:
    return np.ones(shape, bool)
  return np.broadcast_to(np.asarray(where, bool), shape)


def moments(x, axes, where=None):
  """Mean and biased variance of the valid elements, keepdims, 0 where none is valid."""
  x = np.asarray(x, np.float64)
  valid = mask_of(where, x.shape)
  count = valid.sum(axis=axes, keepdims=True)
  safe = np.maximum(count, 1)
  mean = np.where(valid, x, 0).sum(axis=axes, keepdims=True) / safe
  var = np.where(valid, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / safe
  return mean, var, count


def standardize(x, axes, where=None, epsilon=0.0):
  mean, var, _ = moments(x, axes, where)
  return (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon)


def group_norm(x, num_groups, where=None, epsilon=0.0):
  x = np.asarray(x, np.float64)
  grouped = x.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))
  valid = mask_of(where, x.shape).reshape(grouped.shape)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  return standardize(grouped, axes, valid, epsilon).reshape(x.shape)


def rms_norm(x, axes, where=None, epsilon=0.0):
  x = np.asarray(x, np.float64)
  valid = mask_of(where, x.shape)
  count = np.maximum(valid.sum(axis=axes, keepdims=True), 1)
  mean_square = np.where(valid, x * x, 0).sum(axis=axes, keepdims=True) / count
  return x / np.sqrt(mean_square + epsilon)


def max_error(actual, expected, where=None):
  """Largest absolute error over the valid positions."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  valid = mask_of(where, np.broadcast_shapes(actual.shape, expected.shape))
  diff = np.abs(np.broadcast_to(actual - expected, valid.shape))
  return float(diff[valid].max()) if valid.any() else 0.0


def relative_error(actual, expected, where=None):
  """Largest |actual - expected| / (1 + |expected|) over the valid positions."""
  expected = np.asarray(expected, np.float64)
  scale = 1 + np.abs(expected)
  return max_error(np.asarray(actual, np.float64) / scale, expected / scale, where)


TORCH_REQUIREMENT = "torch==2.13.0"  # the Makefile's TORCH: a CPU build on the project's machines


def import_torch():
  """PyTorch, for a test module's comparisons: a skip where it is absent, a failure under CI.

  Outside CI, a missing PyTorch skips the calling module with a note. Under ``CI=true`` it is an
  error instead, so that CI cannot pass without having run the PyTorch comparisons. Call it at
  module level, where ``pytest.importorskip`` would go.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return torch
  except ImportError as error:
    missing = str(error)  # reported outside the handler, without the ImportError's traceback
  if os.environ.get("CI") == "true":
    pytest.fail(f"PyTorch is required under CI=true: pip install {TORCH_REQUIREMENT} ({missing})",
                pytrace=False)
  pytest.skip(f"PyTorch is not installed ({missing}): pip install {TORCH_REQUIREMENT} to run the "
              f"comparisons with it", allow_module_level=True)
