"""jaxnorm.beam.FitStats on Beam's DirectRunner equals fit_stats over all the data.

One pipeline on two worker processes (direct_running_mode='multi_processing'), so accumulators
are really serialized and merged across processes; the other checks run in-process.
"""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

import jaxnorm
import jaxnorm.beam
from jaxnorm._src import stats_result


def parts():
  """Unequal float batches with outliers, and uint8 images: sketched and exact channels."""
  rng = np.random.default_rng(0)
  floats = []
  for n in (3000, 17, 2500, 900, 1):
    x = rng.standard_normal((n, 3)) * [1.0, 1e-2, 5.0] + [0.0, 1e3, -3.0]
    x[rng.random(n) < 1e-3, 0] = 1e9
    floats.append(x)
  images = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(6)]
  return floats, images


def assert_equal_to_fit_stats(stats, batches):
  together = jaxnorm.fit_stats(batches)
  np.testing.assert_array_equal(stats.count, together.count)
  for name in ("mean", "var", "std"):
    np.testing.assert_allclose(getattr(stats, name), getattr(together, name), rtol=1e-12)
  np.testing.assert_array_equal(stats.min, together.min)
  np.testing.assert_array_equal(stats.max, together.max)
  flat = np.concatenate([b.reshape(-1, 3) for b in batches]).astype(np.float64)
  for q, values in ((0.25, stats.q25), (0.5, stats.median), (0.75, stats.q75)):
    low = np.mean(flat < values, axis=0)
    high = np.mean(flat <= values, axis=0)
    gap = np.maximum(np.maximum(low - q, q - high), 0)
    assert np.all(gap <= stats.quantile_error + 1 / len(flat)), (q, gap)


def test_fit_stats_on_two_worker_processes_equals_fit_stats(tmp_path):
  floats, images = parts()
  options = PipelineOptions(direct_running_mode="multi_processing", direct_num_workers=2)
  with beam.Pipeline(options=options) as pipeline:
    rows = pipeline | "rows" >> beam.Create(floats, reshuffle=True)
    records = pipeline | "images" >> beam.Create([{"image": i, "label": 1} for i in images])
    _ = (rows | "fit rows" >> jaxnorm.beam.FitStats()
         | "save rows" >> beam.Map(jaxnorm.save_stats, str(tmp_path / "rows.json")))
    _ = (records | "fit images" >> jaxnorm.beam.FitStats(field="image", output="accumulator")
         | "save images" >> beam.Map(jaxnorm.save_stats, str(tmp_path / "images.json")))
  assert_equal_to_fit_stats(jaxnorm.load_stats(tmp_path / "rows.json"), floats)
  acc = jaxnorm.load_accumulator(tmp_path / "images.json")
  exact = jaxnorm.fit_stats(images)
  for name in stats_result.ARRAY_FIELDS:  # uint8: every statistic exact
    np.testing.assert_allclose(getattr(acc.result(), name), getattr(exact, name), rtol=1e-12)


def test_combine_fn_merges_in_any_grouping_and_says_how_to_fix_records():
  floats, _ = parts()
  fn = jaxnorm.beam.StatsCombineFn()
  accumulators = [fn.add_input(fn.create_accumulator(), x) for x in floats]
  merged = fn.merge_accumulators([fn.merge_accumulators(accumulators[3:]),
                                  fn.merge_accumulators(accumulators[:3])])
  assert_equal_to_fit_stats(fn.extract_output(merged), floats)
  with pytest.raises(ValueError, match=r"name the field holding the array.*field='...'"):
    fn.add_input(fn.create_accumulator(), {"x": floats[0]})
  with pytest.raises(ValueError, match=r"field='pixels'.*no such field; it holds \['image'\]"):
    jaxnorm.beam.StatsCombineFn(field="pixels").add_input(fn.create_accumulator(), {"image": 1})
  with pytest.raises(ValueError, match="empty PCollection"):
    fn.extract_output(fn.create_accumulator())
