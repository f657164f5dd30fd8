"""Dataset statistics: exact moments, sketch quantiles with a rank bound, the accumulator, JSON.

References are float64 NumPy over the concatenated data; quantiles are checked by the rank their
value has in the sorted data (the sketch's guarantee), and for exact paths against np.quantile.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import Mesh, PartitionSpec as P

import jaxnorm
from jaxnorm._src import accumulator as accumulator_lib
from jaxnorm._src import host_moments
from jaxnorm._src import quantile_sketch
from jaxnorm._src import stats_result

QUANTILES = (0.25, 0.5, 0.75)
BOUND = quantile_sketch.rank_error()


def reference(x, channel_axis=-1, nan=False):
  """Float64 NumPy statistics of x with the channels along channel_axis, one row per channel."""
  x = np.asarray(x, np.float64)
  x = x.reshape(-1, 1) if channel_axis is None else np.moveaxis(x, channel_axis, -1).reshape(
      -1, x.shape[channel_axis])
  mean, var = (np.nanmean, np.nanvar) if nan else (np.mean, np.var)
  quantile = np.nanquantile if nan else np.quantile
  return {"count": np.sum(~np.isnan(x), 0), "mean": mean(x, 0), "var": var(x, 0),
          "min": np.nanmin(x, 0), "max": np.nanmax(x, 0),
          "quantiles": quantile(x, QUANTILES, axis=0), "flat": x}


def fitted_quantiles(stats):
  return np.stack([stats.q25, stats.median, stats.q75])


def assert_moments(stats, ref, rtol=1e-6):
  np.testing.assert_array_equal(stats.count, ref["count"])
  assert np.asarray(stats.count).dtype.kind == "i"
  np.testing.assert_allclose(stats.mean, ref["mean"], rtol=rtol, atol=0)
  np.testing.assert_allclose(stats.var, ref["var"], rtol=rtol, atol=0)
  np.testing.assert_allclose(stats.std, np.sqrt(ref["var"]), rtol=rtol, atol=0)
  np.testing.assert_array_equal(stats.min, ref["min"])
  np.testing.assert_array_equal(stats.max, ref["max"])


def rank_gap(flat, q, values):
  """Per channel, how far q lies from the normalized ranks [#(x < v), #(x <= v)] / n of v."""
  gaps = []
  for column, value in zip(flat.T, values):
    column = np.sort(column[~np.isnan(column)])
    low = np.searchsorted(column, value, "left") / len(column)
    high = np.searchsorted(column, value, "right") / len(column)
    gaps.append(max(low - q, q - high, 0.0))
  return np.array(gaps)


def assert_quantiles_within_rank_bound(stats, ref):
  """Each quantile's rank within quantile_error (plus one value for the interpolation)."""
  slack = 1.0 / np.min(ref["count"])
  for q, values in zip(QUANTILES, fitted_quantiles(stats)):
    gap = rank_gap(ref["flat"], q, values)
    assert np.all(gap <= stats.quantile_error + slack), (q, gap, stats.quantile_error)
  assert np.all(stats.quantile_error <= BOUND)


def split(x, pieces, seed=0):
  """x cut along axis 0 at random places into up to ``pieces`` batches (some may be empty)."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(0, len(x) + 1, pieces - 1))
  return np.split(x, cuts)


def test_the_rank_bound_is_at_most_1e_3():
  assert 9e-4 < BOUND <= 1e-3
  assert "9.9" in quantile_sketch.__doc__ and "70 KiB" in quantile_sketch.__doc__


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_far_from_zero(offset, dtype):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((6000, 3)) * [1, 2, 0.5] + offset).astype(dtype)
  stats = jaxnorm.fit_stats(split(x, 9))
  ref = reference(x)
  assert_moments(stats, ref)
  assert_quantiles_within_rank_bound(stats, ref)
  np.testing.assert_array_equal(stats.quantile_error, BOUND)  # 6000 values: sketched


@settings(max_examples=15, deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
       axis_choice=st.integers(0, 10), pieces=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       offset=st.sampled_from([0.0, 1e3, 1e6]))
def test_any_channel_axis_and_batching_small_data_exact(shape, axis_choice, pieces, seed, offset):
  """Fewer values than a sketch keeps: NumPy's linear quantiles exactly, error 0."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 3 + offset
  choices = list(range(-len(shape), len(shape))) + [None]
  channel_axis = choices[axis_choice % len(choices)]
  batch_axis = 0 if channel_axis is None or channel_axis % len(shape) != 0 else None
  batches = [x] if batch_axis is None else split(x, pieces, seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 1-d batches warn
    stats = jaxnorm.fit_stats(batches, channel_axis=channel_axis)
  ref = reference(x, channel_axis)
  assert stats.channel_axis == channel_axis
  assert_moments(stats, ref, rtol=1e-9)
  np.testing.assert_allclose(fitted_quantiles(stats), ref["quantiles"], rtol=1e-12, atol=0)
  np.testing.assert_array_equal(stats.quantile_error, 0)


NASTY = {
    "outliers at 1e9": lambda rng, n: np.where(rng.random(n) < 1e-3, 1e9, rng.standard_normal(n)),
    "pareto(1)": lambda rng, n: rng.pareto(1.0, n),
    "std 1e-3 around 1e6": lambda rng, n: 1e6 + 1e-3 * rng.standard_normal(n),
}


@pytest.mark.parametrize("kind", sorted(NASTY))
def test_rank_bound_holds_on_outliers_heavy_tails_and_offsets(kind):
  """The histogram gave median 93 for normal data with 0.1% at 1e9; the sketch's rank holds."""
  rng = np.random.default_rng(2)
  x = NASTY[kind](rng, 200_000).reshape(-1, 2)
  acc = jaxnorm.accumulate_stats(split(x, 6))
  stats = acc.result()
  ref = reference(x)
  # std / mean = 1e-9: float64 itself (NumPy's two-pass reference too) holds about 7 digits.
  assert_moments(stats, ref, rtol=1e-6 if kind.startswith("std") else 1e-9)
  assert_quantiles_within_rank_bound(stats, ref)
  q = np.array([0.001, 0.1, 0.9, 0.999])
  for p, values in zip(q, acc.quantile(q)):
    assert np.all(rank_gap(ref["flat"], p, values) <= BOUND), p
  iqr = ref["quantiles"][2] - ref["quantiles"][0]
  assert np.all(np.abs(fitted_quantiles(stats) - ref["quantiles"]) < 0.01 * iqr)
  if kind == "outliers at 1e9":  # robust scaling now gives an IQR of about 1
    y = np.asarray(jaxnorm.robust(x, stats))
    spread = np.quantile(y, 0.75, axis=0) - np.quantile(y, 0.25, axis=0)
    np.testing.assert_allclose(spread, 1.0, rtol=0.01)


def test_uint8_images_are_exact_including_any_quantile():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
  images[..., 2] = rng.integers(100, 110, images.shape[:-1])  # a narrow channel
  acc = jaxnorm.accumulate_stats(list(images[:, None]))  # one image per batch
  stats = acc.result()
  ref = reference(images)
  assert_moments(stats, ref, rtol=1e-12)
  np.testing.assert_array_equal(fitted_quantiles(stats), ref["quantiles"])
  np.testing.assert_array_equal(stats.quantile_error, 0)
  assert acc.sketches is None  # counted exactly, 384 counts per channel
  q = [0.1, 0.37, 0.9]
  np.testing.assert_array_equal(acc.quantile(q), np.quantile(images.reshape(-1, 3), q, axis=0))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int64, np.bool_])
def test_integer_and_bool_data(dtype):
  rng = np.random.default_rng(3)
  high = 2 if dtype == np.bool_ else 100 if dtype == np.int8 else 30000
  x = rng.integers(-high if dtype != np.bool_ else 0, high, (5000, 2)).astype(dtype)
  stats = jaxnorm.fit_stats(split(x, 4))
  ref = reference(x)
  assert_moments(stats, ref, rtol=1e-12)
  if high <= 100:  # 8-bit: exact
    np.testing.assert_array_equal(fitted_quantiles(stats), ref["quantiles"])
    np.testing.assert_array_equal(stats.quantile_error, 0)
  else:
    assert_quantiles_within_rank_bound(stats, ref)


def test_uint8_then_float_batches_move_the_counts_into_the_sketch():
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (700, 2), dtype=np.uint8)
  floats = rng.standard_normal((900, 2)) * 50 + 128
  for order in ([pixels, floats], [floats, pixels]):
    acc = jaxnorm.accumulate_stats(order)
    data = np.concatenate([o.astype(np.float64) for o in order])
    np.testing.assert_allclose(acc.quantile(QUANTILES), np.quantile(data, QUANTILES, axis=0),
                               rtol=1e-12)  # 1600 values: the sketch holds them all
    merged = jaxnorm.accumulate_stats(order[0]).merge(jaxnorm.accumulate_stats(order[1]))
    np.testing.assert_array_equal(merged.quantile(QUANTILES), acc.quantile(QUANTILES))


def test_merge_in_any_order_equals_one_fit():
  rng = np.random.default_rng(6)
  parts = [rng.standard_normal((n, 3)) * (i + 1) + 10 ** i for i, n in enumerate([50, 7000, 3])]
  parts.append(rng.integers(0, 256, (400, 3), dtype=np.uint8))
  ref = reference(np.concatenate([p.astype(np.float64) for p in parts]))
  fitted = [jaxnorm.accumulate_stats(p) for p in parts]
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
    merged = jaxnorm.StatsAccumulator()
    for i in order:
      merged.merge(fitted[i])
    stats = merged.result()
    assert_moments(stats, ref, rtol=1e-12)
    assert_quantiles_within_rank_bound(stats, ref)
  np.testing.assert_array_equal(fitted[0].result().count, [50] * 3)  # merge leaves others alone


def test_update_like_partial_fit_and_small_parts_stay_exact():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((900, 3)) + 5
  acc = jaxnorm.accumulate_stats(x[:10])
  for start in range(10, 900, 89):
    acc.update(x[start:start + 89])
  stats = acc.result()
  assert_moments(stats, reference(x), rtol=1e-12)
  np.testing.assert_allclose(acc.quantile([0.1, 0.5, 0.99]),
                             np.quantile(x, [0.1, 0.5, 0.99], axis=0), rtol=1e-12)
  np.testing.assert_array_equal(stats.quantile_error, 0)


def test_stats_is_a_pytree_that_survives_jit_device_put_and_tree_map():
  rng = np.random.default_rng(13)
  x = rng.standard_normal((500, 3)) * 2 + 9
  stats = jaxnorm.fit_stats(x)
  leaves = jax.tree.leaves(stats)
  assert len(leaves) == 11 and all(np.shape(leaf)[0] == 3 for leaf in leaves)
  for moved in (jax.jit(lambda s: s)(stats), jax.device_put(stats),
                jax.tree.map(np.asarray, stats)):
    assert isinstance(moved, jaxnorm.Stats) and moved.channel_axis == stats.channel_axis
    for name in stats_result.ARRAY_FIELDS:
      np.testing.assert_allclose(getattr(moved, name), getattr(stats, name), rtol=1e-6)
  y = jax.jit(jaxnorm.robust)(x, stats)  # quantiles as a jitted argument
  np.testing.assert_allclose(y, (x - np.median(x, 0)) / (np.quantile(x, 0.75, 0)
                                                         - np.quantile(x, 0.25, 0)), rtol=1e-5,
                             atol=1e-5)
  doubled = jax.tree.map(lambda a: a * 2, stats)
  np.testing.assert_allclose(doubled.median, 2 * stats.median)


def test_stats_answer_whole_percents_also_traced():
  x = np.random.default_rng(16).standard_normal((1000, 2)) * [1, 50]
  stats = jaxnorm.fit_stats(x)
  q = np.array([[0.0, 0.1], [0.99, 1.0]])
  np.testing.assert_allclose(stats.quantile(q), np.quantile(x, q, axis=0), rtol=1e-12)
  np.testing.assert_allclose(jax.jit(lambda s: s.quantile([0.1, 0.9]))(stats),
                             np.quantile(x, [0.1, 0.9], axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match=r"percentiles 0, 1, ..., 100; q=0.125.*\.quantile\(q\)"):
    stats.quantile(0.125)
  np.testing.assert_allclose(jaxnorm.accumulate_stats(x).quantile(0.125),
                             np.quantile(x, 0.125, axis=0), rtol=1e-12)
  with pytest.raises(ValueError, match="hold no percentiles"):
    jaxnorm.fit_stats(x, quantiles=False).quantile(0.5)


def test_stats_update_and_merge_never_drop_quantiles_silently():
  x = np.arange(12.0).reshape(6, 2)
  with pytest.raises(ValueError, match=r"cannot update Stats that hold quantiles.*"
                     r"jaxnorm.accumulate_stats"):
    jaxnorm.fit_stats(x).update(x)
  with pytest.raises(ValueError, match="cannot merge Stats that hold quantiles"):
    jaxnorm.fit_stats(x, quantiles=False).merge(jaxnorm.fit_stats(x))
  moments = jaxnorm.fit_stats(x[:2], quantiles=False).update(x[2:5]).merge(
      jaxnorm.fit_stats(x[5:], quantiles=False))
  assert_moments(moments, reference(x), rtol=1e-12)
  assert moments.median is None


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
  np.testing.assert_allclose(fitted_quantiles(stats), ref["quantiles"], rtol=1e-12)
  assert stats.ignore_nan


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
  with pytest.raises(ValueError, match="4 channels cannot join statistics of 3 channels"):
    jaxnorm.fit_stats([np.ones((2, 3)), np.ones((2, 4))])
  with pytest.raises(ValueError, match="got no batch"):
    jaxnorm.fit_stats([])
  with pytest.raises(ValueError, match="channel_axis=2: axis 2 is out of range"):
    jaxnorm.fit_stats(np.ones((2, 3)), channel_axis=2)
  with pytest.raises(ValueError, match=r"k=1 must lie in \[8, 65535\]"):
    jaxnorm.fit_stats(np.ones((2, 3)), k=1)
  with pytest.raises(ValueError, match="channel_axis=0.*channel_axis=-1.*same settings"):
    jaxnorm.accumulate_stats(np.ones((2, 3))).merge(
        jaxnorm.accumulate_stats(np.ones((3, 2)), channel_axis=0))
  with pytest.raises(ValueError, match="holds no data yet"):
    jaxnorm.StatsAccumulator().result()
  with pytest.raises(ValueError, match=r"q=\[1.5\] must lie in \[0, 1\]; for percentiles"):
    jaxnorm.accumulate_stats(np.ones((2, 3))).quantile([1.5])


def test_a_1d_array_is_one_row_and_warns():
  with pytest.warns(UserWarning, match=r"ONE row of 5 channels.*x\[:, None\]"):
    stats = jaxnorm.fit_stats(np.arange(5.0))
  assert stats.channels == 5
  assert jaxnorm.fit_stats(np.arange(5.0)[:, None]).mean == 2.0


def test_progress_bar_with_known_and_given_length(capsys):
  jaxnorm.fit_stats([np.ones((2, 3))] * 3, progress=True)
  assert "3/3" in capsys.readouterr().err
  jaxnorm.fit_stats((np.ones((2, 3)) for _ in range(4)), progress=True, total=4)
  assert "4/4" in capsys.readouterr().err


# --- the accumulator as JSON, across processes ----------------------------------------------


def test_accumulator_json_and_pickle_round_trips_are_exact(tmp_path):
  rng = np.random.default_rng(14)
  acc = jaxnorm.accumulate_stats([rng.standard_normal((5000, 2)) + 1e4,
                                  rng.integers(0, 256, (10, 2), dtype=np.uint8)])
  small = jaxnorm.accumulate_stats(rng.integers(0, 256, (10, 2), dtype=np.uint8))
  for original in (acc, small, jaxnorm.StatsAccumulator(quantiles=False)):
    path = tmp_path / "acc.json"
    jaxnorm.save_stats(original, path)
    data = json.loads(path.read_text())
    assert data["format"] == "jaxnorm.StatsAccumulator"
    for copy in (jaxnorm.load_accumulator(path), pickle.loads(pickle.dumps(original)),
                 original.copy()):
      if original.moments is None:
        assert copy.moments is None
        continue
      before, after = original.result(), copy.result()
      for name in stats_result.ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
  path = tmp_path / "big.json"
  acc.save(path)
  loaded = jaxnorm.StatsAccumulator.load(path)
  more = rng.standard_normal((100, 2))
  continued = loaded.update(more).result()  # quantiles survive loading, update and merge
  assert continued.median is not None and continued.count[0] == 5110
  np.testing.assert_array_equal(jaxnorm.load_stats(path).median, acc.result().median)


def test_loading_stats_with_quantiles_as_an_accumulator_raises(tmp_path):
  path = tmp_path / "stats.json"
  jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2)).save(path)
  with pytest.raises(ValueError, match="holds Stats with quantiles but no sketch"):
    jaxnorm.load_accumulator(path)
  jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2), quantiles=False).save(path)
  acc = jaxnorm.load_accumulator(path).update(np.array([[6.0, 7.0]]))
  np.testing.assert_allclose(acc.result().mean, [3.0, 4.0])


def valid_accumulator():
  acc = jaxnorm.accumulate_stats(np.random.default_rng(0).standard_normal((3000, 2)))
  return accumulator_lib.to_dict(acc)


def edited_accumulator(**changes):
  return json.dumps(valid_accumulator() | changes)


BAD_ACCUMULATORS = {
    "corrupt sketch": (lambda: edited_accumulator(sketches=["AAAA", "bm90"]),
                       "'sketches': not a serialized KLL sketch"),
    "not base64": (lambda: edited_accumulator(sketches=["%%%", "%%%"]), "not a serialized"),
    "count mismatch": (lambda: edited_accumulator(count=[3000, 2999]),
                       "differ from 'count'"),
    "negative m2": (lambda: edited_accumulator(m2=[-1.0, 1.0]), "negative 'm2'"),
    "null min": (lambda: edited_accumulator(min=[None, 0.0]), "null exactly where 'count' is 0"),
    "bad counts": (lambda: edited_accumulator(exact_counts=[[[300, 1]], []]),
                   r"values in \[-128, 255\]"),
    "k": (lambda: edited_accumulator(k=3), r"k=3 must lie in \[8, 65535\]"),
    "Stats file": (lambda: json.dumps(stats_result.to_dict(jaxnorm.fit_stats(np.ones((2, 2))))),
                   "holds Stats with quantiles"),
}


@pytest.mark.parametrize("case", sorted(BAD_ACCUMULATORS))
def test_malformed_accumulator_files_raise(tmp_path, case):
  make, message = BAD_ACCUMULATORS[case]
  path = tmp_path / "acc.json"
  path.write_text(make())
  with pytest.raises(ValueError, match=message):
    jaxnorm.load_accumulator(path)


def test_merge_across_processes_single_process_and_simulated():
  rng = np.random.default_rng(11)
  parts = [rng.standard_normal((n, 3)) + 7 for n in (40, 4000, 4)]
  fitted = [jaxnorm.accumulate_stats(p) for p in parts]
  alone = jaxnorm.merge_across_processes(fitted[1])
  np.testing.assert_array_equal(alone.median, fitted[1].result().median)
  buffers = {}

  def gather(buffer):  # what process_allgather returns on process 1 of 3
    if buffer.dtype == np.int32:  # the lengths
      buffers.clear()
      for i in (0, 2):
        buffers[i] = np.frombuffer(json.dumps(accumulator_lib.to_dict(fitted[i])).encode(),
                                   np.uint8)
      return np.stack([[len(buffers[0])], buffer, [len(buffers[2])]])
    width = max(len(buffer), *(len(b) for b in buffers.values()))
    pad = lambda b: np.pad(b, (0, width - len(b)))  # noqa: E731
    return np.stack([pad(buffers[0]), pad(buffer), pad(buffers[2])])

  merged = jaxnorm.merge_across_processes(fitted[1], gather=gather)
  ref = reference(np.concatenate(parts))
  assert_moments(merged, ref, rtol=1e-12)
  assert_quantiles_within_rank_bound(merged, ref)
  with pytest.raises(ValueError, match="pass the accumulator instead"):
    jaxnorm.merge_across_processes(fitted[0].result())
  moments = jaxnorm.merge_across_processes(fitted[0].result().__class__(
      **{**vars(fitted[0].result()), "median": None, "q25": None, "q75": None,
         "quantile_error": None}))
  assert_moments(moments, reference(parts[0]), rtol=1e-12)


def test_quantiles_benchmark_runs_in_quick_mode():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "benchmarks", "quantiles.py"), "--quick"],
      capture_output=True, text=True, timeout=300, cwd=root,
      env={**os.environ, "PYTHONPATH": root})
  assert result.returncode == 0, result.stderr[-2000:]
  for title in ("## Accuracy", "| normal + 0.1% at 1e9 | fit_stats |", "REQ k=96",
                "np.quantile", "as the stream grows"):
    assert title in result.stdout, result.stdout


# --- on the devices ------------------------------------------------------------------------------


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
  np.testing.assert_array_equal(stats.count, ref["count"])
  assert stats.count.dtype == jnp.int32  # integers, as fit_stats gives
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




# --- Stats as JSON -------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact_json(tmp_path):
  x = np.random.default_rng(12).standard_normal((5000, 3)) * 1e-3 + 1e4
  stats = jaxnorm.fit_stats(x, channel_axis=-1)
  path = tmp_path / "stats.json"
  stats.save(path)
  text = path.read_text()
  data = json.loads(text)  # plain JSON, human-readable
  assert data["format"] == "jaxnorm.Stats" and data["version"] == 2 and len(text.splitlines()) > 30
  for loaded in (jaxnorm.Stats.load(path), jaxnorm.load_stats(str(path))):
    for name in stats_result.ARRAY_FIELDS:
      np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
    assert loaded.channel_axis == -1


def test_version_1_files_are_still_read(tmp_path):
  data = stats_result.to_dict(jaxnorm.fit_stats(np.array([[0.0, 1.0], [2.0, 5.0]])))
  data["version"] = 1
  path = tmp_path / "v1.json"
  path.write_text(json.dumps(data))
  np.testing.assert_array_equal(jaxnorm.load_stats(path).median, [1.0, 3.0])


def test_save_without_quantiles_and_from_device_stats(tmp_path):
  path = tmp_path / "s.json"
  jaxnorm.fit_stats(np.arange(6.0).reshape(3, 2), quantiles=False).save(path)
  assert jaxnorm.Stats.load(path).median is None
  jaxnorm.save_stats(jaxnorm.device_stats(jnp.arange(6.0).reshape(3, 2)), path)
  np.testing.assert_array_equal(jaxnorm.load_stats(path).count, [3, 3])


def valid_data():
  stats = jaxnorm.fit_stats(np.array([[0.0, 1.0], [2.0, 5.0], [4.0, 6.0]]))
  return stats_result.to_dict(stats)


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
    "count": (edited(count=[3, 2.5]), r"'count' must hold integers from 0 to 2\*\*53"),
    "some quantiles": (edited(median=None), r"\['median'\] are null"),
    "channel_axis": (edited(channel_axis="last"), "'channel_axis' must be an integer or null"),
    "huge float count": (edited(count=[1e300, 1e300]), r"'count' must hold integers from 0 to "
                         r"2\*\*53"),
    "count 2**63": (edited(count=[2**63, 3]), r"'count' must hold integers from 0"),
    "negative count": (edited(count=[-3, 3]), r"'count' must hold integers from 0"),
    "rank error above 1": (edited(quantile_error=[2.0, 0.0]), r"must lie in \[0, 1\]"),
    "huge integer": (edited().replace('"mean": [2.0', '"mean": [1' + '0' * 400),
                     "'mean' holds a number that is not a float64"),
    "channel_axis null": (edited(channel_axis=None), r"'channel_axis' is null .* 'channels' is 2"),
    "var above range": (
        edited(var=[7.0, 4.666666666666667], std=[7.0 ** 0.5, 2.160246899469287]),
        r"'var' is 7.0 in channel 0, more than \(\(max - min\) / 2\)\*\*2 \* n / \(n - 1\) = 6.0"),
    "var of a constant": (edited(min=[2.0, 1.0], max=[2.0, 6.0], median=None, q25=None, q75=None,
                                 percentiles=None,
                                 quantile_error=None),
                          r"'var' is 2.666.* in channel 0, more than .* = 0.0 allows"),
    "percentiles length": (edited(percentiles=[[0.0] * 100, [1.0] * 101]),
                           r"'percentiles' must be 2 lists of 101 numbers"),
    "percentiles order": (edited(percentiles=[[2.0] + [0.0] * 100, [1.0] * 101]),
                          "'percentiles' must rise from min to max"),
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
  empty = stats_result.from_moments(host_moments.empty(2), channel_axis=-1, ignore_nan=True)
  with pytest.raises(ValueError, match=r"the statistics to save: channel\(s\) \[0, 1\] hold no"):
    empty.save(path)
  with pytest.raises(TypeError, match="writes jaxnorm.Stats or jaxnorm.StatsAccumulator"):
    jaxnorm.save_stats({"mean": 1}, path)


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


def test_read_only_and_memory_mapped_batches(tmp_path):
  x = np.random.default_rng(15).standard_normal((3000, 1))
  np.save(tmp_path / "x.npy", x)
  mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
  for batch in (mapped, mapped[:, 0], np.asarray(mapped)):
    stats = jaxnorm.fit_stats(batch, channel_axis=None)
    assert_moments(stats, reference(x), rtol=1e-12)
