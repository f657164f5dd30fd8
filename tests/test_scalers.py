"""Scalers with fitted statistics against scikit-learn's StandardScaler, MinMaxScaler and
RobustScaler (float64, fitted on the same data), and the presets against their formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from sklearn import preprocessing

import jaxnorm


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def table(seed=0, offset=0.0):
  """Features of very different scales, one of them constant, float32 like most inputs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((400, 5)) * [0.1, 1.0, 50.0, 1e3, 1.0] + [0, 3, -20, 1e3, 7]
  x[:, 4] = 7.0  # zero variance
  return (x + offset).astype(np.float32)


def assert_close(actual, expected, atol):
  actual = np.asarray(actual, np.float64)
  assert np.all(np.isfinite(actual))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_standardize_matches_standard_scaler(use_jit, offset):
  x = table(offset=offset)
  stats = jaxnorm.fit_stats(np.array_split(x, 3))
  reference = preprocessing.StandardScaler().fit(x.astype(np.float64))
  y = maybe_jit(jaxnorm.standardize, use_jit)(x, stats)
  assert y.dtype == jnp.float32
  assert_close(y, reference.transform(x.astype(np.float64)), atol=1e-4 * (1 + offset / 100))
  back = maybe_jit(jaxnorm.inverse_standardize, use_jit)(y, stats)
  assert_close(back, x, atol=1e-3 * (1 + offset / 100))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("feature_range", [(0.0, 1.0), (-1.0, 1.0), (2.0, 5.0)])
@pytest.mark.parametrize("clip", [False, True])
def test_minmax_matches_minmax_scaler(use_jit, feature_range, clip):
  x = table(1)
  stats = jaxnorm.fit_stats(x)
  reference = preprocessing.MinMaxScaler(feature_range=feature_range, clip=clip).fit(
      x.astype(np.float64))
  unseen = table(2) * 1.5  # partly outside the fitted range
  fn = maybe_jit(functools.partial(jaxnorm.minmax, feature_range=feature_range, clip=clip),
                 use_jit)
  for data in (x, unseen):
    assert_close(fn(data, stats), reference.transform(data.astype(np.float64)), atol=1e-5)
  y = fn(x, stats)
  back = jaxnorm.inverse_minmax(y, stats, feature_range=feature_range)
  assert_close(back, x, atol=1e-3)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("quantile_range", [(25.0, 75.0), (10.0, 90.0), (0.0, 100.0)])
def test_robust_matches_robust_scaler_exactly_on_integer_data(use_jit, quantile_range):
  rng = np.random.default_rng(3)
  x = rng.integers(-1000, 1000, (999, 3)).astype(np.float32)
  x[:, 2] = 5.0  # zero range
  stats = jaxnorm.fit_stats(np.array_split(x, 4))
  np.testing.assert_array_equal(stats.quantile_error, 0)  # on a grid: exact quantiles
  reference = preprocessing.RobustScaler(quantile_range=quantile_range).fit(x.astype(np.float64))
  # Quantiles other than q25 and q75 come from the stored percentiles, traced under jit too.
  fn = maybe_jit(lambda v: jaxnorm.robust(v, stats, quantile_range=quantile_range), use_jit)
  y = fn(x)
  assert_close(y, reference.transform(x.astype(np.float64)), atol=1e-6)
  back = jaxnorm.inverse_robust(y, stats, quantile_range=quantile_range)
  assert_close(back, x, atol=1e-3)


def test_robust_on_continuous_data_within_the_quantile_bound():
  x = np.random.default_rng(4).standard_normal((5000, 2)) * [1, 100]
  stats = jaxnorm.fit_stats(x)  # 5000 values per channel: sketched, rank error <= 1e-3
  assert np.all(stats.quantile_error > 0) and np.all(stats.quantile_error <= 1e-3)
  for q, values in ((0.25, stats.q25), (0.5, stats.median), (0.75, stats.q75)):
    ranks = np.mean(x <= values, axis=0)
    assert np.all(np.abs(ranks - q) <= stats.quantile_error + 1 / len(x)), (q, ranks)
  y = np.asarray(jaxnorm.robust(x, stats), np.float64)
  np.testing.assert_allclose(y, (x - stats.median) / (stats.q75 - stats.q25), rtol=1e-5,
                             atol=1e-5)
  expected = preprocessing.RobustScaler().fit(x).transform(x)
  assert np.all(np.abs(y - expected) <= 0.01 * (1 + np.abs(expected)))


def test_zero_variance_channels_do_not_divide_by_zero():
  x = np.full((10, 2), 3.0, np.float32)
  x[:, 1] = np.arange(10)
  stats = jaxnorm.fit_stats(x)
  for fn, reference in ((jaxnorm.standardize, preprocessing.StandardScaler()),
                        (jaxnorm.minmax, preprocessing.MinMaxScaler()),
                        (jaxnorm.robust, preprocessing.RobustScaler())):
    y = fn(x + 1, stats)  # a shifted constant channel: x - centre, not inf
    assert_close(y, reference.fit(x.astype(np.float64)).transform(x + 1.0), atol=1e-6)
  np.testing.assert_array_equal(jaxnorm.standardize(x, stats)[:, 0], 0)
  np.testing.assert_array_equal(jaxnorm.minmax(x, stats, feature_range=(-1, 1))[:, 0], -1)


def test_spread_in_the_statistics_precision_under_x64():
  """max - min and q75 - q25 are taken in float64, not after rounding each to float32."""
  x = np.array([[1e8], [1e8 + 1], [1e8 + 2], [1e8 + 3]])
  with jax.enable_x64(True):
    stats = jaxnorm.fit_stats(x)
    for use_jit in (False, True):
      y = maybe_jit(jaxnorm.minmax, use_jit)(x, stats)
      assert y.dtype == jnp.float64
      expected = (x - x.min(0)) / (x.max(0) - x.min(0))
      np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(y, preprocessing.MinMaxScaler().fit_transform(x), atol=1e-12)
      np.testing.assert_allclose(maybe_jit(jaxnorm.inverse_minmax, use_jit)(y, stats), x,
                                 rtol=1e-15)
      y = maybe_jit(jaxnorm.robust, use_jit)(x, stats)
      q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75], axis=0)
      np.testing.assert_allclose(y, (x - median) / (q75 - q25), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(y, preprocessing.RobustScaler().fit_transform(x), atol=1e-12)
      np.testing.assert_allclose(maybe_jit(jaxnorm.inverse_robust, use_jit)(y, stats), x,
                                 rtol=1e-15)


def test_uint8_in_float_out_and_other_dtypes():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
  stats = jaxnorm.fit_stats(images)
  y = jaxnorm.standardize(images, stats)
  assert y.dtype == jnp.float32
  pixels = images.astype(np.float64).reshape(-1, 3)
  expected = (images - pixels.mean(0)) / pixels.std(0)
  assert_close(y, expected, atol=1e-5)
  assert jaxnorm.standardize(images, stats, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert jaxnorm.standardize(images.astype(jnp.bfloat16), stats).dtype == jnp.bfloat16


def test_channel_axis_first_and_none():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 3, 5, 5)) * [[[[1]], [[10]], [[100]]]]  # NCHW
  stats = jaxnorm.fit_stats(x, channel_axis=1)
  per_channel = np.moveaxis(x, 1, -1).reshape(-1, 3)
  expected = (x - per_channel.mean(0)[:, None, None]) / per_channel.std(0)[:, None, None]
  assert_close(jaxnorm.standardize(x, stats), expected, atol=1e-5)
  whole = jaxnorm.fit_stats(x, channel_axis=None)
  assert_close(jaxnorm.standardize(x, whole), (x - x.mean()) / x.std(), atol=1e-5)


def test_loaded_stats_work_under_jit_as_a_pytree(tmp_path):
  x = table(7)
  path = tmp_path / "stats.json"
  jaxnorm.fit_stats(x).save(path)
  stats = jaxnorm.load_stats(path)
  y = jax.jit(jaxnorm.standardize)(x, stats)
  assert_close(y, jaxnorm.standardize(x, jaxnorm.fit_stats(x)), atol=1e-6)
  assert_close(jax.jit(jaxnorm.robust)(x, stats), jaxnorm.robust(x, jaxnorm.fit_stats(x)),
               atol=1e-6)
  # Stats hold the percentiles 0..100: other ranges work loaded and as jitted arguments too.
  robust_10_90 = functools.partial(jaxnorm.robust, quantile_range=(10, 90))
  assert_close(jax.jit(robust_10_90)(x, stats), robust_10_90(x, jaxnorm.fit_stats(x)), atol=1e-6)
  with pytest.raises(ValueError, match=r"keep the percentiles 0, 1, ..., 100.*accumulate_stats"):
    jaxnorm.robust(x, stats, quantile_range=(12.5, 87.5))
  acc = jaxnorm.accumulate_stats(x)  # an accumulator answers any quantile
  q_low, q_high = np.quantile(x, [0.125, 0.875], axis=0)
  assert_close(jaxnorm.robust(x, acc, quantile_range=(12.5, 87.5)),
               (x - np.median(x, 0)) / np.where(q_high > q_low, q_high - q_low, 1), atol=1e-5)


def test_gradients_with_respect_to_the_input():
  x = table(8)[:16]
  stats = jaxnorm.fit_stats(table(8))
  for fn in (jaxnorm.standardize, jaxnorm.minmax, jaxnorm.robust):
    check_grads(lambda v, fn=fn: fn(v, stats), (jnp.asarray(x, jnp.float32),), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)
  grad = jax.grad(lambda v: jaxnorm.standardize(v, stats).sum())(jnp.asarray(x, jnp.float32))
  expected = np.where(stats.std > 0, 1 / np.where(stats.std > 0, stats.std, 1), 1)
  np.testing.assert_allclose(grad, np.broadcast_to(expected, x.shape), rtol=1e-6)


def test_presets():
  pixels = np.arange(256, dtype=np.uint8).reshape(-1, 1) * np.ones((1, 3), np.uint8)
  unit = jaxnorm.pixels_to_unit(pixels)
  assert unit.dtype == jnp.float32
  np.testing.assert_allclose(unit, pixels / 255.0, rtol=1e-7)
  assert float(unit[255, 0]) == 1.0 and float(unit[0, 0]) == 0.0
  symmetric = jaxnorm.pixels_to_symmetric(pixels)
  np.testing.assert_allclose(symmetric, pixels / 127.5 - 1, rtol=1e-6, atol=1e-7)
  assert float(symmetric[255, 0]) == 1.0 and float(symmetric[0, 0]) == -1.0
  imagenet = jaxnorm.imagenet_standardize(pixels)
  expected = (pixels / 255.0 - np.array(jaxnorm.IMAGENET_MEAN)) / np.array(jaxnorm.IMAGENET_STD)
  np.testing.assert_allclose(imagenet, expected, rtol=1e-5, atol=1e-6)
  chw = np.moveaxis(pixels.reshape(16, 16, 3), -1, 0)
  np.testing.assert_allclose(jaxnorm.imagenet_standardize(chw, channel_axis=0),
                             np.moveaxis(expected.reshape(16, 16, 3), -1, 0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(jaxnorm.pixels_to_unit(pixels.astype(np.float32) / 255,
                                                    max_value=1.0), pixels / 255.0, rtol=1e-6)


def test_bad_arguments_say_how_to_fix_them():
  stats = jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2))
  with pytest.raises(ValueError, match=r"feature_range=\(1, 0\) must be \(low, high\)"):
    jaxnorm.minmax(np.ones((3, 2)), stats, feature_range=(1, 0))
  with pytest.raises(ValueError, match="quantile_range=.* must be"):
    jaxnorm.robust(np.ones((3, 2)), stats, quantile_range=(75, 25))
  with pytest.raises(ValueError, match="does not fit x.shape=.*feature shape"):
    jaxnorm.standardize(np.ones((3, 4)), stats)
  no_quantiles = jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2), quantiles=False)
  with pytest.raises(ValueError, match="quantiles=True"):
    jaxnorm.robust(np.ones((3, 2)), no_quantiles)


def test_docstrings_hold_their_latex():
  """A backslash escape such as \\f in \\frac must not become a control character."""
  from jaxnorm._src import (accumulator, host_moments, linen_input, quantile_sketch, scalers,
                            stats_io, stats_result)
  for module in (scalers, accumulator, host_moments, quantile_sketch, stats_result, stats_io,
                 linen_input):
    own = [(name, obj) for name, obj in vars(module).items()
           if getattr(obj, "__module__", None) == module.__name__]
    for name, obj in [(module.__name__, module)] + own:
      doc = getattr(obj, "__doc__", None) or ""
      assert not any(c in doc for c in "\f\a\b\v\r\t\0"), (module.__name__, name)
  assert "\\frac{a}{s}" in scalers.rescale.__doc__


@pytest.mark.parametrize("use_jit", [False, True])
def test_inverses_match_scikit_learn_inverse_transform(use_jit):
  x = np.round(table(9).astype(np.float64) * [100, 10, 1, 1, 1])  # integers: exact quantiles
  stats = jaxnorm.fit_stats(x)  # 400 values per channel: the sketch holds them all
  np.testing.assert_array_equal(stats.quantile_error, 0)
  rng = np.random.default_rng(10)
  y = rng.standard_normal((50, 5)).astype(np.float32)  # arbitrary scaled values
  cases = ((jaxnorm.inverse_standardize, preprocessing.StandardScaler()),
           (functools.partial(jaxnorm.inverse_minmax, feature_range=(-1.0, 2.0)),
            preprocessing.MinMaxScaler(feature_range=(-1.0, 2.0))),
           (jaxnorm.inverse_robust, preprocessing.RobustScaler()))
  for inverse, scaler in cases:
    expected = scaler.fit(x).inverse_transform(y.astype(np.float64))
    actual = maybe_jit(inverse, use_jit)(y, stats)
    scale = np.max(np.abs(expected), axis=0)
    assert np.all(np.abs(np.asarray(actual, np.float64) - expected) <= 1e-6 * scale), inverse


@pytest.mark.parametrize("use_jit", [False, True])
def test_explicit_constants_equal_the_statistics_forms_and_jax_nn_standardize(use_jit):
  x = table(11, offset=100.0)
  stats = jaxnorm.fit_stats(x)
  mean, std = np.asarray(stats.mean), np.asarray(stats.std)
  y = maybe_jit(jaxnorm.standardize, use_jit)(x, mean, std)
  np.testing.assert_allclose(y, jaxnorm.standardize(x, stats), rtol=1e-6, atol=1e-6)
  safe = np.where(std > 0, std, 1)
  np.testing.assert_allclose(y, jax.nn.standardize(x, axis=0, mean=mean, variance=safe ** 2,
                                                   epsilon=0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jaxnorm.inverse_standardize(y, mean, std), x, rtol=1e-5, atol=1e-4)
  low, high = np.asarray(stats.min), np.asarray(stats.max)
  y = maybe_jit(functools.partial(jaxnorm.minmax, feature_range=(-1, 1)), use_jit)(x, low, high)
  # Under jit, high - low is taken from traced float32 values: equal to a float32 rounding.
  np.testing.assert_allclose(y, jaxnorm.minmax(x, stats, feature_range=(-1, 1)), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(jaxnorm.inverse_minmax(y, low, high, feature_range=(-1, 1)), x,
                             rtol=1e-5, atol=1e-3)
  center, scale = np.asarray(stats.median), np.asarray(stats.q75 - stats.q25)
  y = maybe_jit(jaxnorm.robust, use_jit)(x, center, scale)
  np.testing.assert_allclose(y, jaxnorm.robust(x, stats), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jaxnorm.inverse_robust(y, center, scale), x, rtol=1e-5, atol=1e-3)


def test_explicit_constants_follow_the_channel_axis_and_scalars():
  rng = np.random.default_rng(12)
  nchw = rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
  mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
  y = jaxnorm.standardize(nchw, mean, std, channel_axis=1)
  expected = (nchw - mean[:, None, None]) / std[:, None, None]  # torchvision's normalize
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jaxnorm.minmax(nchw, 0.0, 255.0, channel_axis=None), nchw / 255.0,
                             rtol=1e-6)
  np.testing.assert_allclose(jaxnorm.standardize(nchw, 127.5, 127.5, channel_axis=None),
                             nchw / 127.5 - 1, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="does not fit x.shape"):
    jaxnorm.standardize(nchw, mean, std)  # channels last by default: 4, not 3


def test_constant_forms_say_how_to_fix_a_wrong_call():
  x = np.ones((3, 2))
  stats = jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2))
  with pytest.raises(TypeError, match=r"standardize\(x, mean, std\) needs both constants"):
    jaxnorm.standardize(x, np.zeros(2))
  with pytest.raises(TypeError, match=r"takes fitted statistics alone"):
    jaxnorm.standardize(x, stats, np.ones(2))
  with pytest.raises(ValueError, match="channel_axis=0 differs from the statistics'"):
    jaxnorm.minmax(x, stats, channel_axis=0)
  with pytest.raises(ValueError, match=r"applies to fitted statistics only.*robust\(x, center"):
    jaxnorm.robust(x, 0.0, 1.0, quantile_range=(10, 90))
