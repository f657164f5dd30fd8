"""Quantiles of dataset statistics: the KLL and REQ sketches side by side, and the cost of fitting.

Part 1, accuracy (one channel of ``--values`` values per data kind): normal; normal with 0.1% of
the values at 1e9; Pareto(1) (NumPy's Lomax form, median 1); std 1e-3 around 1e6; uint8 image
pixels. For each method: the worst normalized rank error over q = 0.01, 0.02, ..., 0.99 (the
distance from q to the range of ranks the returned value has in the sorted data), the worst at
q25/median/q75, the value error at q25/median/q75 as a fraction of the true interquartile range,
the items kept and the serialized bytes, and the update time. Methods:

- ``fit_stats``: jaxnorm (KLL doubles, k = 2900; exact counts for uint8), NumPy's linear quantile;
- ``KLL k=2900``: DataSketches' ``kll_doubles_sketch``, the raw sketch quantile;
- ``REQ k=96``: DataSketches' ``req_floats_sketch`` (float32 values; high-rank-accuracy mode),
  k chosen to keep about as many items as KLL.

Part 2, fitting time per call (median of ``--repeats``): ``fit_stats`` with quantiles, with
moments alone, and ``np.quantile`` of the whole array in memory (not streaming), on
(100000, 1024) float32 in batches of 10000 rows, and on (256, 224, 224, 3) uint8 images in
batches of 32. Part 3: the serialized size of one channel's sketch as the stream grows.

``--beam``: ``jaxnorm.beam.FitStats`` on Beam's DirectRunner with 1 and 2 worker processes
against ``fit_stats`` on (100000, 256) float32 in 10 batches (time with the runner's start-up,
and the largest gap of mean and median to ``fit_stats``, in units of the std).

Run ``python benchmarks/quantiles.py`` (a few minutes on 2 cores), or ``--quick`` for small sizes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import datasketches
import numpy as np

import jaxnorm

QS = np.round(np.arange(1, 100) / 100, 2)
IQR_QS = (0.25, 0.5, 0.75)


def data_kinds(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  normal = rng.standard_normal(n)
  outliers = normal.copy()
  outliers[rng.choice(n, n // 1000, replace=False)] = 1e9
  image = np.clip(rng.normal(110, 60, n), 0, 255).astype(np.uint8)
  return {"normal": normal, "normal + 0.1% at 1e9": outliers,
          "Pareto(1)": rng.pareto(1.0, n), "std 1e-3 around 1e6": 1e6 + 1e-3 * normal,
          "uint8 image pixels": image}


def rank_error(sorted_x: np.ndarray, q: float, value: float) -> float:
  """Distance from q to the normalized ranks [#(x < v), #(x <= v)] / n of the value v."""
  n = len(sorted_x)
  low = np.searchsorted(sorted_x, value, "left") / n
  high = np.searchsorted(sorted_x, value, "right") / n
  return float(max(low - q, q - high, 0.0))


def methods(x: np.ndarray):
  """Each method's quantile function, items kept, bytes and update seconds."""
  start = time.perf_counter()
  acc = jaxnorm.accumulate_stats(x[:, None])
  seconds = time.perf_counter() - start
  kept = acc.sketches[0].num_retained if acc.sketches else 384
  size = len(acc.sketches[0].serialize()) if acc.sketches else 384 * 8
  yield "fit_stats", (lambda q: float(acc.quantile(q)[0])), kept, size, seconds
  kll = datasketches.kll_doubles_sketch(2900)
  start = time.perf_counter()
  kll.update(x.astype(np.float64))
  seconds = time.perf_counter() - start
  yield "KLL k=2900", (lambda q: kll.get_quantile(q, True)), kll.num_retained, len(
      kll.serialize()), seconds
  req = datasketches.req_floats_sketch(96, True)
  start = time.perf_counter()
  req.update(x.astype(np.float32))
  seconds = time.perf_counter() - start
  yield "REQ k=96", (lambda q: req.get_quantile(q, True)), req.num_retained, len(
      req.serialize()), seconds


def accuracy(n: int, seed: int) -> None:
  print(f"## Accuracy: {n} values per data kind\n")
  print("| data | method | worst rank error q=.01..99 | worst at q25/median/q75 | value error "
        "/ IQR at q25/median/q75 | items | bytes | update s |")
  print("|---|---|---|---|---|---|---|---|")
  for kind, x in data_kinds(n, np.random.default_rng(seed)).items():
    sorted_x = np.sort(x.astype(np.float64))
    exact = np.quantile(sorted_x, IQR_QS)
    iqr = exact[2] - exact[0]
    for name, quantile, kept, size, seconds in methods(x):
      worst = max(rank_error(sorted_x, q, quantile(q)) for q in QS)
      middle = max(rank_error(sorted_x, q, quantile(q)) for q in IQR_QS)
      value = max(abs(quantile(q) - e) for q, e in zip(IQR_QS, exact)) / iqr
      print(f"| {kind} | {name} | {worst:.1e} | {middle:.1e} | {value:.1e} | {kept} | {size} | "
            f"{seconds:.3f} |")
  print(f"\nKLL's a-priori bound at k=2900: {jaxnorm.StatsAccumulator().k} -> "
        f"{datasketches.kll_doubles_sketch(2900).normalized_rank_error(False):.2e} "
        f"(99% confidence)\n")


def timed(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def fitting(shape: tuple[int, ...], batch: int, dtype, repeats: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    x = rng.integers(0, 256, shape, dtype=np.uint8)
  else:
    x = rng.standard_normal(shape, dtype=np.float32)
  batches = [x[i:i + batch] for i in range(0, len(x), batch)]
  flat = x.reshape(-1, x.shape[-1])
  rows = {
      "fit_stats, with quantiles": lambda: jaxnorm.fit_stats(batches),
      "fit_stats, moments alone": lambda: jaxnorm.fit_stats(batches, quantiles=False),
      "np.quantile (q25, median, q75; whole array)": lambda: np.quantile(flat, IQR_QS, axis=0),
  }
  print(f"## Fitting {shape} {np.dtype(dtype).name} in batches of {batch}\n")
  print("| method | seconds | MB/s |")
  print("|---|---|---|")
  for name, fn in rows.items():
    seconds = timed(fn, repeats)
    print(f"| {name} | {seconds:.3f} | {x.nbytes / seconds / 1e6:.0f} |")
  print()


def memory(sizes: list[int], seed: int) -> None:
  rng = np.random.default_rng(seed)
  print("## One channel's KLL sketch (k=2900) as the stream grows\n")
  print("| values | items kept | serialized bytes |")
  print("|---|---|---|")
  sketch = datasketches.kll_doubles_sketch(2900)
  seen = 0
  for size in sizes:
    while seen < size:
      step = min(size - seen, 1_000_000)
      sketch.update(rng.standard_normal(step))
      seen += step
    print(f"| {size} | {sketch.num_retained} | {len(sketch.serialize())} |")
  print()


def _make_batch(spec: tuple[int, int, int]) -> np.ndarray:
  """Batch ``index`` of the benchmark data, made where it is used (no data in the graph)."""
  seed, rows, columns = spec
  return np.random.default_rng(seed).standard_normal((rows, columns), dtype=np.float32)


def beam_timing(shape: tuple[int, int], batch: int, seed: int) -> None:
  """jaxnorm.beam.FitStats on the DirectRunner (1 and 2 worker processes) against fit_stats.

  The workers make their batches from seeds (as they would read files), so the pipeline graph
  holds no data.
  """
  import tempfile  # pylint: disable=import-outside-toplevel

  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel

  import jaxnorm.beam  # pylint: disable=import-outside-toplevel
  specs = [(seed + i, min(batch, shape[0] - start), shape[1])
           for i, start in enumerate(range(0, shape[0], batch))]
  start = time.perf_counter()
  together = jaxnorm.fit_stats(_make_batch(spec) for spec in specs)
  rows = {"fit_stats (one process, same batches)": (time.perf_counter() - start, 0.0, 0.0)}
  folder = tempfile.mkdtemp()
  for workers in (1, 2):
    path = f"{folder}/stats-{workers}.json"
    options = PipelineOptions([], direct_running_mode="multi_processing",
                              direct_num_workers=workers)
    start = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
      _ = (pipeline | beam.Create(specs, reshuffle=True) | beam.Map(_make_batch)
           | jaxnorm.beam.FitStats() | beam.Map(jaxnorm.save_stats, path))
    seconds = time.perf_counter() - start
    stats = jaxnorm.load_stats(path)
    mean_gap = float(np.max(np.abs(stats.mean - together.mean) / together.std))
    median_gap = float(np.max(np.abs(stats.median - together.median) / together.std))
    rows[f"Beam DirectRunner, {workers} worker process(es)"] = (seconds, mean_gap, median_gap)
  print(f"## Beam FitStats against fit_stats, {shape} float32 in batches of {batch}\n")
  print("| run | seconds (start-up included) | max mean gap / std | max median gap / std |")
  print("|---|---|---|---|")
  for name, (seconds, mean_gap, median_gap) in rows.items():
    print(f"| {name} | {seconds:.2f} | {mean_gap:.1e} | {median_gap:.1e} |")
  print()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
  parser.add_argument("--values", type=int, default=1_000_000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--beam", action="store_true",
                      help="only the Beam comparison (needs apache-beam: jaxnorm[beam])")
  args = parser.parse_args()
  if args.beam:
    if args.quick:
      beam_timing((2000, 16), 500, args.seed)
    else:
      beam_timing((100_000, 256), 10_000, args.seed)
    return
  if args.quick:
    accuracy(20_000, args.seed)
    fitting((2000, 64), 500, np.float32, 1, args.seed)
    fitting((8, 32, 32, 3), 4, np.uint8, 1, args.seed)
    memory([10_000, 100_000], args.seed)
    return
  accuracy(args.values, args.seed)
  fitting((100_000, 1024), 10_000, np.float32, args.repeats, args.seed)
  fitting((256, 224, 224, 3), 32, np.uint8, args.repeats, args.seed)
  memory([10_000, 100_000, 1_000_000, 10_000_000, 100_000_000], args.seed)


if __name__ == "__main__":
  main()
