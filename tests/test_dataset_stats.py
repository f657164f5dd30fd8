"""fit_stats, Stats.merge/update, device_stats, merge_across_processes and the JSON format.

References: NumPy in float64 over the concatenated data (mean, var, min, max, np.quantile).
"""
import json
import os
import re
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.sharding import Mesh, PartitionSpec as P

import jaxnorm
from jaxnorm._src import dataset_stats

QUANTILES = (0.25, 0.5, 0.75)


def reference(x, channel_axis=-1, nan=False):
  """Float64 NumPy statistics of x with the channels along channel_axis, one row per channel."""
  x = np.asarray(x, np.float64)
  x = x.reshape(-1, 1) if channel_axis is None else np.moveaxis(x, channel_axis, -1).reshape(
      -1, x.shape[channel_axis])
  mean, var = (np.nanmean, np.nanvar) if nan else (np.mean, np.var)
  quantile = np.nanquantile if nan else np.quantile
  return {"count": np.sum(~np.isnan(x), 0), "mean": mean(x, 0), "var": var(x, 0),
          "min": np.nanmin(x, 0), "max": np.nanmax(x, 0),
          "quantiles": quantile(x, QUANTILES, axis=0)}


def fitted_quantiles(stats):
  return np.stack([stats.q25, stats.median, stats.q75])


def assert_moments(stats, ref, rtol=1e-6):
  np.testing.assert_array_equal(stats.count, ref["count"])
  np.testing.assert_allclose(stats.mean, ref["mean"], rtol=rtol, atol=0)
  np.testing.assert_allclose(stats.var, ref["var"], rtol=rtol, atol=0)
  np.testing.assert_allclose(stats.std, np.sqrt(ref["var"]), rtol=rtol, atol=0)
  np.testing.assert_array_equal(stats.min, ref["min"])
  np.testing.assert_array_equal(stats.max, ref["max"])


def assert_quantiles_within_bound(stats, ref, bins=dataset_stats.DEFAULT_BINS):
  error = np.abs(fitted_quantiles(stats) - ref["quantiles"])
  assert np.all(error <= stats.quantile_error), (error.max(0), stats.quantile_error)
  assert np.all(stats.quantile_error <= 2 * (stats.max - stats.min) / (bins - 1))


def assert_same_histogram(a, b):
  """The same bin width and the same count in every bin (windows may start in other places)."""
  np.testing.assert_array_equal(a.exponent, b.exponent)
  for channel in range(len(a.exponent)):
    bins_a = a.start[channel] + np.flatnonzero(a.counts[channel])
    bins_b = b.start[channel] + np.flatnonzero(b.counts[channel])
    np.testing.assert_array_equal(bins_a, bins_b)
    np.testing.assert_array_equal(a.counts[channel][a.counts[channel] > 0],
                                  b.counts[channel][b.counts[channel] > 0])


def split(x, pieces, seed=0):
  """x cut along axis 0 at random places into up to ``pieces`` batches (some may be empty)."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(0, len(x) + 1, pieces - 1))
  return np.split(x, cuts)


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_far_from_zero(offset, dtype):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((6000, 5)) * [1, 2, 0.5, 3, 1] + offset).astype(dtype)
  stats = jaxnorm.fit_stats(split(x, 9))
  ref = reference(x)
  assert_moments(stats, ref)
  assert_quantiles_within_bound(stats, ref)


@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
       axis_choice=st.integers(0, 10), pieces=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       offset=st.sampled_from([0.0, 1e3, 1e6]))
def test_any_channel_axis_and_batching(shape, axis_choice, pieces, seed, offset):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 3 + offset
  choices = list(range(-len(shape), len(shape))) + [None]
  channel_axis = choices[axis_choice % len(choices)]
  batch_axis = 0 if channel_axis is None or channel_axis % len(shape) != 0 else None
  if batch_axis is None:
    batches = [x]
  else:
    batches = [b for b in split(x, pieces, seed)]
  stats = jaxnorm.fit_stats(batches, channel_axis=channel_axis)
  ref = reference(x, channel_axis)
  assert stats.channel_axis == channel_axis
  assert_moments(stats, ref, rtol=1e-9)
  assert_quantiles_within_bound(stats, ref)


def test_uint8_images_are_exact_including_quantiles():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
  images[..., 2] = rng.integers(100, 110, images.shape[:-1])  # a narrow channel
  stats = jaxnorm.fit_stats(list(images[:, None]))  # one image per batch
  ref = reference(images)
  assert_moments(stats, ref, rtol=1e-12)
  np.testing.assert_array_equal(fitted_quantiles(stats), ref["quantiles"])
  np.testing.assert_array_equal(stats.quantile_error, 0)
  np.testing.assert_array_equal(stats.quantile([0.1, 0.9]),
                                np.quantile(images.reshape(-1, 3), [0.1, 0.9], axis=0))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int64, np.bool_])
def test_integer_and_bool_data(dtype):
  rng = np.random.default_rng(3)
  high = 2 if dtype == np.bool_ else 100 if dtype == np.int8 else 30000
  x = rng.integers(-high if dtype != np.bool_ else 0, high, (5000, 2)).astype(dtype)
  stats = jaxnorm.fit_stats(split(x, 4), bins=512)
  ref = reference(x)
  assert_moments(stats, ref, rtol=1e-12)
  assert_quantiles_within_bound(stats, ref, bins=512)
  if high <= 100:  # range within the bins: exact
    np.testing.assert_array_equal(fitted_quantiles(stats), ref["quantiles"])


@pytest.mark.parametrize("bins", [16, 256, 4096])
@pytest.mark.parametrize("distribution", ["normal", "exponential", "bimodal", "offset"])
def test_quantile_error_bound(bins, distribution):
  rng = np.random.default_rng(4)
  n = 20000
  x = {"normal": lambda: rng.standard_normal((n, 3)),
       "exponential": lambda: rng.exponential(1.0, (n, 3)) ** 3,
       "bimodal": lambda: np.where(rng.random((n, 3)) < 0.5, -50.0, 50.0) + rng.random((n, 3)),
       "offset": lambda: rng.standard_normal((n, 3)) + 1e6}[distribution]()
  stats = jaxnorm.fit_stats(split(x, 7, seed=bins), bins=bins)
  ref = reference(x)
  assert_quantiles_within_bound(stats, ref, bins)
  q = np.linspace(0, 1, 11)
  assert np.all(np.abs(stats.quantile(q) - np.quantile(x, q, axis=0)) <= stats.quantile_error)


def test_default_bins_are_far_inside_the_bound_for_normal_data():
  x = np.random.default_rng(5).standard_normal((200000, 1)).astype(np.float32)
  stats = jaxnorm.fit_stats(split(x, 5))
  ref = reference(x)
  iqr = ref["quantiles"][2] - ref["quantiles"][0]
  assert np.all(np.abs(fitted_quantiles(stats) - ref["quantiles"]) < 1e-3 * iqr)


def test_values_on_a_grid_give_exact_float_quantiles():
  x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0], [0.5]])
  stats = jaxnorm.fit_stats([x[:3], x[3:]])
  np.testing.assert_array_equal(fitted_quantiles(stats), reference(x)["quantiles"])
  np.testing.assert_array_equal(stats.quantile_error, 0)


def test_merge_is_exact_and_order_free():
  rng = np.random.default_rng(6)
  parts = [rng.standard_normal((n, 4)) * (i + 1) + 10 ** i for i, n in enumerate([50, 700, 3])]
  fitted = [jaxnorm.fit_stats(p, bins=128) for p in parts]
  together = jaxnorm.fit_stats(np.concatenate(parts), bins=128)
  for merged in (fitted[0].merge(fitted[1]).merge(fitted[2]),
                 fitted[2].merge(fitted[0].merge(fitted[1])),
                 fitted[1].merge(fitted[2]).merge(fitted[0])):
    assert_moments(merged, reference(np.concatenate(parts)), rtol=1e-12)
    assert_same_histogram(merged.histogram, together.histogram)
    np.testing.assert_array_equal(merged.median, together.median)


def test_update_like_partial_fit():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((900, 3)) + 5
  stats = jaxnorm.fit_stats(x[:10])
  for start in range(10, 900, 89):
    stats = stats.update(x[start:start + 89])
  assert_moments(stats, reference(x), rtol=1e-12)
  error = np.abs(stats.quantile(np.array(QUANTILES)) - np.quantile(x, QUANTILES, axis=0))
  assert np.all(error <= stats.quantile_error), (error, stats.quantile_error)
  assert np.all(np.abs(stats.median - np.median(x, axis=0)) <= stats.quantile_error)


def test_jit_and_device_put_keep_the_histogram_off_the_device():
  """The histogram is host data, not a leaf: traced or device_put Stats have histogram=None."""
  rng = np.random.default_rng(13)
  x, more = rng.standard_normal((500, 3)) * 2 + 9, rng.standard_normal((300, 3)) * 2 + 9
  stats = jaxnorm.fit_stats(x, bins=256)
  assert all(np.shape(leaf) == (3,) for leaf in jax.tree.leaves(stats))
  for moved in (jax.jit(lambda s: s)(stats), jax.device_put(stats)):
    assert moved.histogram is None and moved.channel_axis == stats.channel_axis
    np.testing.assert_allclose(moved.median, stats.median, rtol=1e-6)
    with pytest.raises(ValueError, match="hold no histogram.*jax.jit"):
      moved.quantile(0.1)
    merged = stats.merge(jaxnorm.fit_stats(more, bins=256)).merge(moved)  # no "immutable"
    ref = reference(np.concatenate([x, more, x]))
    np.testing.assert_array_equal(merged.count, ref["count"])
    for name in ("mean", "var", "min", "max"):  # moved holds float32 without x64
      np.testing.assert_allclose(getattr(merged, name), ref[name], rtol=1e-6)
    assert merged.median is None
  # The fitted statistics themselves are untouched and still give quantiles within the bound.
  error = np.abs(stats.quantile(0.1) - np.quantile(x, 0.1, axis=0))
  assert np.all(error <= stats.quantile_error)
  y = jax.jit(jaxnorm.standardize)(x, stats)
  np.testing.assert_allclose(y, (x - x.mean(0)) / x.std(0), rtol=1e-5, atol=1e-5)


def test_jax_arrays_and_one_array():
  x = jax.random.normal(jax.random.key(0), (300, 2)) + 100
  stats = jaxnorm.fit_stats(x)
  assert_moments(stats, reference(np.asarray(x)))
  assert isinstance(stats.mean, np.ndarray) and stats.mean.dtype == np.float64


def test_ignore_nan():
  rng = np.random.default_rng(8)
  x = rng.standard_normal((1000, 3)) + 3
  x[rng.random(x.shape) < 0.2] = np.nan
  x[:, 2][:500] = np.nan
  stats = jaxnorm.fit_stats(split(x, 5), ignore_nan=True)
  ref = reference(x, nan=True)
  assert_moments(stats, ref, rtol=1e-12)
  assert_quantiles_within_bound(stats, ref)
  assert stats.ignore_nan and stats.update(x[:10]).ignore_nan


def test_nan_infinity_and_empty_channels_raise():
  x = np.ones((10, 3))
  x[4, 1] = np.nan
  with pytest.raises(ValueError, match=r"batch 1 .*NaN in channel\(s\) \[1\].*ignore_nan=True"):
    jaxnorm.fit_stats([np.ones((2, 3)), x])
  x[5, 2] = np.inf
  with pytest.raises(ValueError, match=r"infinite value in channel\(s\) \[2\]"):
    jaxnorm.fit_stats(x, ignore_nan=True)
  x = np.ones((4, 2))
  x[:, 0] = np.nan
  with pytest.raises(ValueError, match=r"channel\(s\) \[0\] hold no value"):
    jaxnorm.fit_stats(x, ignore_nan=True)
  with pytest.raises(ValueError, match=r"only empty batches \(no rows, e.g. shape \(0, 3\)\)"):
    jaxnorm.fit_stats([np.zeros((0, 3)), np.zeros((0, 3))])


def test_bad_calls_say_how_to_fix_them():
  with pytest.raises(ValueError, match="3 and 4 channels"):
    jaxnorm.fit_stats([np.ones((2, 3)), np.ones((2, 4))])
  with pytest.raises(ValueError, match="got no batch"):
    jaxnorm.fit_stats([])
  with pytest.raises(ValueError, match="channel_axis=2: axis 2 is out of range"):
    jaxnorm.fit_stats(np.ones((2, 3)), channel_axis=2)
  with pytest.raises(ValueError, match="bins=1"):
    jaxnorm.fit_stats(np.ones((2, 3)), bins=1)
  with pytest.raises(ValueError, match="channel_axis=-1 and channel_axis=0"):
    jaxnorm.fit_stats(np.ones((2, 3))).merge(jaxnorm.fit_stats(np.ones((3, 2)), channel_axis=0))


def test_without_quantiles():
  stats = jaxnorm.fit_stats(np.arange(12.0).reshape(6, 2), quantiles=False)
  assert stats.median is None and stats.histogram is None
  assert_moments(stats, reference(np.arange(12.0).reshape(6, 2)), rtol=1e-12)
  with pytest.raises(ValueError, match="hold no histogram"):
    stats.quantile(0.5)


def test_progress_bar_with_known_and_given_length(capsys):
  jaxnorm.fit_stats([np.ones((2, 3))] * 3, progress=True)
  assert "3/3" in capsys.readouterr().err
  jaxnorm.fit_stats((np.ones((2, 3)) for _ in range(4)), progress=True, total=4)
  assert "4/4" in capsys.readouterr().err


def sharded_data():
  """8 shards of unequal valid sizes (NaN marks padding), one of them empty."""
  rng = np.random.default_rng(9)
  x = (rng.standard_normal((8, 64, 3)) * 2 + 1e4).astype(np.float32)
  valid_rows = [64, 1, 0, 30, 64, 5, 17, 2]
  for shard, rows in enumerate(valid_rows):
    x[shard, rows:] = np.nan
  flat = x.reshape(-1, 3)
  return x, flat[~np.isnan(flat[:, 0])]


def assert_device_stats(stats, valid):
  ref = reference(valid)
  np.testing.assert_allclose(stats.count, ref["count"])
  np.testing.assert_allclose(stats.mean, ref["mean"], rtol=1e-6)
  np.testing.assert_allclose(stats.var, ref["var"], rtol=1e-4)
  np.testing.assert_allclose(stats.min, ref["min"], rtol=1e-7)
  np.testing.assert_allclose(stats.max, ref["max"], rtol=1e-7)


@pytest.mark.parametrize("use_jit", [False, True])
def test_device_stats_under_vmap(use_jit):
  x, valid = sharded_data()
  fn = jax.vmap(lambda s: jaxnorm.device_stats(s, ignore_nan=True, axis_name="d"), axis_name="d")
  fn = jax.jit(fn) if use_jit else fn
  stats = fn(x)
  for device in range(8):
    assert_device_stats(jax.tree.map(lambda a, d=device: a[d], stats), valid)


def test_device_stats_under_shard_map_on_8_devices_with_one_collective():
  x, valid = sharded_data()
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

  def per_device(shard):
    return jaxnorm.device_stats(shard[0], ignore_nan=True, axis_name="d")

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P()))
  stats = fn(x)
  assert_device_stats(stats, valid)
  jaxpr = str(jax.make_jaxpr(fn)(x))
  assert len(re.findall(r"all_gather\w*\[", jaxpr)) == 1, jaxpr
  assert not any(c in jaxpr for c in ("psum", "pmax", "pmin", "all_to_all"))


def test_device_stats_without_axis_name_matches_host():
  x = np.random.default_rng(10).standard_normal((100, 4, 5)).astype(np.float32) + 1e5
  stats = jax.jit(lambda v: jaxnorm.device_stats(v, channel_axis=1))(x)
  assert_device_stats(stats, np.moveaxis(x, 1, -1).reshape(-1, 4))


@pytest.mark.parametrize("shape, spec, channel_axis, nan", [
    ((64, 3), P("d"), -1, False),
    ((4, 8, 3), P(None, "d"), -1, False),
    ((4, 8, 3), P(None, "d"), -1, True),
    ((8, 3, 5), P("d"), 1, False),
    ((16, 2), P("d"), None, False),
])
def test_device_stats_on_an_explicit_mesh(shape, spec, channel_axis, nan):
  """Input sharded over an Explicit mesh (jax.make_mesh's default) needs no axis_name."""
  x = np.random.default_rng(12).standard_normal(shape) * 3 + 1e3
  if nan:
    x[0, :5, 0] = np.nan
  mesh = jax.make_mesh((8,), ("d",))
  xs = jax.device_put(x.astype(np.float32), jax.sharding.NamedSharding(mesh, spec))
  for fn in (jaxnorm.device_stats, jax.jit(jaxnorm.device_stats, static_argnames=(
      "channel_axis", "ignore_nan"))):
    stats = fn(xs, channel_axis=channel_axis, ignore_nan=nan)
    flat = (x.reshape(-1, 1) if channel_axis is None
            else np.moveaxis(x, channel_axis, -1).reshape(-1, x.shape[channel_axis]))
    ref = reference(flat, nan=nan)
    np.testing.assert_array_equal(np.asarray(stats.count), ref["count"])
    np.testing.assert_allclose(stats.mean, ref["mean"], rtol=1e-6)
    np.testing.assert_allclose(stats.var, ref["var"], rtol=1e-4)
    np.testing.assert_allclose(stats.std, np.sqrt(ref["var"]), rtol=1e-4)
    np.testing.assert_allclose(stats.min, ref["min"].astype(np.float32), rtol=0)
    np.testing.assert_allclose(stats.max, ref["max"].astype(np.float32), rtol=0)
    assert stats.mean.shape == (flat.shape[1],)


def test_device_stats_with_a_nan_and_ignore_nan_false_gives_nan_as_documented():
  """fit_stats raises on a NaN; device_stats runs under jit, so its docstring says NaN results."""
  x = np.arange(12.0).reshape(6, 2)
  x[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN in channel"):
    jaxnorm.fit_stats(x)
  stats = jax.jit(jaxnorm.device_stats)(x)
  assert np.isfinite(stats.mean[0]) and np.isnan(stats.mean[1]) and np.isnan(stats.var[1])
  assert "ignore_nan=False`` a NaN" in jaxnorm.device_stats.__doc__
  np.testing.assert_allclose(jaxnorm.device_stats(x, ignore_nan=True).mean, np.nanmean(x, 0))


def test_merge_across_processes_single_process_and_simulated():
  rng = np.random.default_rng(11)
  parts = [rng.standard_normal((n, 3)) + 7 for n in (40, 400, 4)]
  fitted = [jaxnorm.fit_stats(p, bins=64) for p in parts]
  alone = jaxnorm.merge_across_processes(fitted[1])
  np.testing.assert_array_equal(alone.mean, fitted[1].mean)
  np.testing.assert_array_equal(alone.histogram.counts, fitted[1].histogram.counts)
  packed = [dataset_stats._pack(s) for s in fitted]
  calls = []

  def gather(buffer):  # what process_allgather returns on process 1 of 3
    calls.append(buffer)
    return np.stack([packed[0], buffer, packed[2]])

  merged = jaxnorm.merge_across_processes(fitted[1], gather=gather)
  assert len(calls) == 1 and calls[0].dtype == np.uint32
  together = jaxnorm.fit_stats(np.concatenate(parts), bins=64)
  assert_moments(merged, reference(np.concatenate(parts)), rtol=1e-12)
  assert_same_histogram(merged.histogram, together.histogram)
  np.testing.assert_array_equal(merged.median, together.median)


# --- JSON ---------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact_json(tmp_path):
  x = np.random.default_rng(12).standard_normal((500, 3)) * 1e-3 + 1e4
  stats = jaxnorm.fit_stats(x, channel_axis=-1)
  path = tmp_path / "stats.json"
  stats.save(path)
  text = path.read_text()
  data = json.loads(text)  # plain JSON, human-readable
  assert data["format"] == "jaxnorm.Stats" and len(text.splitlines()) > 30
  loaded = jaxnorm.Stats.load(path)
  for name in ("count", "mean", "var", "std", "min", "max", "median", "q25", "q75",
               "quantile_error"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
  assert loaded.channel_axis == -1 and loaded.histogram is None
  np.testing.assert_array_equal(jaxnorm.load_stats(str(path)).mean, stats.mean)


def test_save_without_quantiles_and_from_device_stats(tmp_path):
  path = tmp_path / "s.json"
  jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2), quantiles=False).save(path)
  assert jaxnorm.Stats.load(path).median is None
  jaxnorm.save_stats(jaxnorm.device_stats(jnp.arange(6.0).reshape(3, 2)), path)
  np.testing.assert_array_equal(jaxnorm.load_stats(path).count, [3, 3])


def valid_data():
  stats = jaxnorm.fit_stats(np.array([[0.0, 1.0], [2.0, 5.0], [4.0, 6.0]]))
  from jaxnorm._src import stats_io
  return stats_io.stats_to_dict(stats)


def edited(**changes):
  data = valid_data()
  for key, value in changes.items():
    if value is KeyError:
      del data[key]
    else:
      data[key] = value
  return json.dumps(data)


MALFORMED = {
    "not json": ("{'mean': [1, 2]", r"not valid JSON \(Expecting property name"),
    "truncated": (edited()[:-20], "not valid JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "other format": (edited(format="sklearn"), "'format' is 'sklearn'"),
    "other version": (edited(version=7), "'version' is 7"),
    "missing key": (edited(mean=KeyError), r"missing key\(s\) \['mean'\]"),
    "wrong length": (edited(std=[1.0, 2.0, 3.0]), "'std' has 3 values but 'channels' is 2"),
    "wrong channels": (edited(channels=3), "'count' has 2 values but 'channels' is 3"),
    "nested shape": (edited(mean=[[1.0], [2.0]]), "'mean' must hold only numbers"),
    "not a list": (edited(var=4.0), "'var' must be a list of 2 numbers"),
    "string": (edited(max=["6", 7.0]), "'max' must hold only numbers"),
    "NaN": (edited().replace('"mean": [2.0', '"mean": [NaN'), "holds NaN"),
    "Infinity": (edited().replace('"max": [4.0', '"max": [Infinity'), "holds Infinity"),
    "negative var": (edited(var=[-1.0, 1.0], std=[1.0, 1.0]), "'var' must not be negative"),
    "std mismatch": (edited(std=[1.0, 1.0]), "'std' is not the square root of 'var'"),
    "min above max": (edited(min=[5.0, 1.0]), "'min' exceeds 'max' in channel 0"),
    "count": (edited(count=[3, 2.5]), "'count' must hold positive integers"),
    "some quantiles": (edited(median=None), r"\['median'\] are null"),
    "channel_axis": (edited(channel_axis="last"), "'channel_axis' must be an integer or null"),
    "huge float count": (edited(count=[1e300, 1e300]), r"'count' must hold positive integers no "
                         r"larger than 2\*\*53"),
    "count 2**63": (edited(count=[2**63, 3]), r"'count' must hold positive integers no larger"),
    "negative count": (edited(count=[-3, 3]), r"'count' must hold positive integers"),
    "huge integer": (edited().replace('"mean": [2.0', '"mean": [1' + '0' * 400),
                     "'mean' holds a number that is not a float64"),
    "channel_axis null": (edited(channel_axis=None), r"'channel_axis' is null .* 'channels' is 2"),
    "var above range": (
        edited(var=[7.0, 4.666666666666667], std=[7.0 ** 0.5, 2.160246899469287]),
        r"'var' is 7.0 in channel 0, more than \(\(max - min\) / 2\)\*\*2 \* n / \(n - 1\) = 6.0"),
    "var of a constant": (edited(min=[2.0, 1.0], max=[2.0, 6.0], median=None, q25=None, q75=None,
                                 quantile_error=None),
                          r"'var' is 2.666.* in channel 0, more than .* = 0.0 allows"),
    "unknown key": (edited(histogram=[1, 2]), r"unknown key\(s\) \['histogram'\]; .* only "
                    r"\['format', 'version'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_value_error_saying_what_is_wrong(tmp_path, case):
  text, message = MALFORMED[case]
  path = tmp_path / "stats.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    jaxnorm.Stats.load(path)


def test_binary_file_and_unsaveable_stats(tmp_path):
  path = tmp_path / "stats.json"
  path.write_bytes(b"\x80\x04\x95pickle")
  with pytest.raises(ValueError, match="not a UTF-8 text file"):
    jaxnorm.load_stats(path)
  empty = jaxnorm.fit_stats(np.ones((3, 2))).merge(
      dataset_stats.stats_of_batch(np.full((1, 2), np.nan), ignore_nan=True))
  stats = dataset_stats.stats_of_batch(np.full((2, 2), np.nan), ignore_nan=True)
  assert np.all(empty.count == 3)
  with pytest.raises(ValueError, match=r"the statistics to save: channel\(s\) \[0, 1\] hold no"):
    stats.save(path)


def test_input_stats_benchmark_runs_in_quick_mode():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "benchmarks", "input_stats.py"), "--quick", "--rounds",
       "1"], capture_output=True, text=True, timeout=300, cwd=root,
      env={**os.environ, "PYTHONPATH": root})
  assert result.returncode == 0, result.stderr[-2000:]
  for title in ("fitting statistics of a float32 table", "fitting statistics of uint8 images",
                "standardizing with fitted statistics"):
    assert title in result.stdout, result.stdout
  assert "device_stats (jit, float32)" in result.stdout
