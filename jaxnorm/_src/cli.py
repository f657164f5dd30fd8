"""Command line: ``python -m jaxnorm stats PATH... [--channel-axis -1] [--out stats.json]``.

Fits per-channel statistics (:func:`jaxnorm.fit_stats`: exact moments, quantiles exact for 8-bit
data and within a 1e-3 rank bound otherwise) over ``.npy``, ``.npz`` and CSV files and folders of
PNG and JPEG images (:mod:`jaxnorm._src.cli_inputs` reads them, streamed), prints a table and
writes the JSON of :func:`jaxnorm.save_stats` (``--out``; ``--save-accumulator`` writes the
accumulator, to merge or continue later). ``--workers N`` splits the files among N local
processes, each folding its share into a :class:`jaxnorm.StatsAccumulator`, merged at the end.

A 1-d array is read as ONE row of N channels, as :func:`jaxnorm.fit_stats` reads it, with a
warning: pass ``--channel-axis none`` for N values of one feature. A problem with the input
prints one line on stderr naming the file and the flag that fixes it, and exits with status 1.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from jaxnorm._src import accumulator
from jaxnorm._src import cli_inputs
from jaxnorm._src import quantile_sketch
from jaxnorm._src import stats_io
from jaxnorm._src import stats_result
from jaxnorm._src.cli_inputs import InputError

TABLE_ROWS = 32
# Library argument names in messages, as the flags that set them.
FLAGS = ((r"ignore_nan=True", "--ignore-nan"), (r"channel_axis=None", "--channel-axis none"),
         (r"channel_axis=(-?\d+)", r"--channel-axis \1"), (r"\bk=(\d+)", r"--sketch-k \1"))


def as_flags(message: str) -> str:
  """A library message with its argument names replaced by the command's flags."""
  for pattern, flag in FLAGS:
    message = re.sub(pattern, flag, message)
  return message


def format_table(stats: stats_result.Stats, max_rows: int = TABLE_ROWS,
                 names: Sequence[str] | None = None) -> str:
  """The statistics as a text table, one row per channel (named after CSV columns if given)."""
  columns = ["count", "mean", "std", "min", "q25", "median", "q75", "max"]
  header = ["channel"] + columns
  rows = []
  for c in range(min(stats.channels, max_rows)):
    row = [names[c] if names and c < len(names) else str(c)]
    for name in columns:
      values = getattr(stats, name)
      row.append("-" if values is None else f"{float(np.asarray(values)[c]):.6g}")
    rows.append(row)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header] + rows]
  if stats.channels > max_rows:
    lines.append(f"... {stats.channels - max_rows} more channels (all of them in --out)")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  launched_as_module = os.path.basename(sys.argv[0]) == "__main__.py"
  parser = argparse.ArgumentParser(prog="python -m jaxnorm" if launched_as_module else "jaxnorm",
                                   description="jaxnorm command line tools.")
  commands = parser.add_subparsers(dest="command", required=True)
  stats = commands.add_parser(
      "stats", help="per-channel statistics of .npy/.npz/.csv files and image folders",
      description="Per-channel count, mean, std, var, min, max, median, q25 and q75 of "
                  ".npy/.npz/.csv files and folders of PNG/JPEG images, streamed. Moments are "
                  "exact; quantiles exact for 8-bit images, else within a 1e-3 rank bound.")
  stats.add_argument("paths", nargs="+", metavar="PATH",
                     help=".npy, .npz or .csv (header line, numeric columns) files, PNG or JPEG "
                          "images, or folders of images")
  stats.add_argument("--channel-axis", type=cli_inputs.channel_axis_arg, default=-1,
                     help="axis of the arrays holding the channels (default -1; 'none' for one "
                          "channel over all values, e.g. a 1-d array of N values); images are "
                          "(height, width, channels), CSV files (rows, columns)")
  stats.add_argument("--out", metavar="JSON", help="write the statistics to this JSON file")
  stats.add_argument("--save-accumulator", metavar="JSON",
                     help="also write the accumulator (moments and sketches) to merge or "
                          "continue later with jaxnorm.load_accumulator")
  stats.add_argument("--key", action="append", metavar="NAME",
                     help="only these arrays of .npz files (repeatable; default all)")
  stats.add_argument("--column", action="append", metavar="NAME",
                     help="only these columns of CSV files (repeatable; default every numeric "
                          "column)")
  stats.add_argument("--mode", choices=cli_inputs.IMAGE_MODES,
                     help="convert every image to this mode first (RGB for folders that mix "
                          "grayscale and colour images, such as ImageNet)")
  stats.add_argument("--ignore-nan", action="store_true",
                     help="skip NaNs (and empty CSV fields) instead of failing")
  stats.add_argument("--sketch-k", type=int, default=quantile_sketch.DEFAULT_K, metavar="K",
                     help="size of the KLL quantile sketch per channel (default %(default)s: "
                          "rank error at most 1e-3; 8-bit data are counted exactly)")
  stats.add_argument("--workers", type=int, default=1, metavar="N",
                     help="split the files among N local processes (default 1)")
  stats.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
  return parser


def _fit(sources, args, progress: bool) -> accumulator.StatsAccumulator:
  state: dict = {}
  try:
    with warnings.catch_warnings():  # cli_inputs already warned about 1-d arrays, with the flag
      warnings.filterwarnings("ignore", message="a 1-d batch")
      return accumulator.accumulate_stats(
          cli_inputs.batches(sources, args.channel_axis, state, args.mode),
          channel_axis=args.channel_axis, ignore_nan=args.ignore_nan, k=args.sketch_k,
          progress=progress, total=sum(s.chunks for s in sources))
  except ValueError as error:
    where = state.get("source")
    raise InputError(as_flags(f"{where}: {error}" if where else str(error))) from None


def _fit_share(job):
  """One worker's share of the files: its accumulator's JSON, or the error's line."""
  sources, args = job
  try:
    return "ok", accumulator.to_dict(_fit(sources, args, progress=False))
  except InputError as error:
    return "error", str(error)
  except Exception as error:  # noqa: BLE001 - one line, never a traceback
    return "error", cli_inputs.reason(error)


def _fit_in_workers(sources, args, progress: bool) -> accumulator.StatsAccumulator:
  """Splits the files into shares, fits them in ``args.workers`` processes, merges in order."""
  shares = min(len(sources), 4 * args.workers)
  bounds = np.linspace(0, len(sources), shares + 1).astype(int)
  jobs = [(sources[a:b], args) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
  context = multiprocessing.get_context("spawn")  # no fork of a process running JAX threads
  results = [None] * len(jobs)
  with context.Pool(args.workers) as pool:
    iterator = pool.imap(_fit_share, jobs)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      iterator = tqdm(iterator, total=len(jobs), unit="share", desc="jaxnorm stats")
    for index, (status, value) in enumerate(iterator):
      if status == "error":
        raise InputError(value)
      results[index] = value
  merged = None
  for (share, _), data in zip(jobs, results):
    part = accumulator.from_dict(data, source="a worker's statistics")
    try:
      merged = part if merged is None else merged.merge(part)
    except ValueError:
      raise InputError(f"{share[0].name} has {part.channels} channels but {jobs[0][0][0].name} "
                       f"has {merged.channels}; give inputs of one channel count") from None
  return merged


def run_stats(args: argparse.Namespace) -> int:
  if args.workers < 1:
    raise InputError(f"--workers {args.workers} must be at least 1")
  cli_inputs.check_out(args.out)
  cli_inputs.check_out(args.save_accumulator)
  sources = cli_inputs.collect(args.paths, args.channel_axis, args.key, args.column)
  if all(s.kind in ("npy", "npz") and math.prod(s.shape) == 0 for s in sources):
    shapes = "; ".join(f"{s.name} has shape {s.shape}" for s in sources[:4])
    raise InputError(f"no rows to fit: {shapes}; give arrays with at least one row")
  progress = sys.stderr.isatty() if args.progress is None else args.progress
  if args.workers > 1 and len(sources) > 1:
    acc = _fit_in_workers(sources, args, progress)
  else:
    acc = _fit(sources, args, progress)
  stats = acc.result()
  counts = {kind: sum(s.kind == kind for s in sources) for kind in ("npy", "npz", "csv", "image")}
  print(f"{int(np.max(stats.count))} values per channel from "
        f"{counts['npy'] + counts['npz']} array(s), {counts['csv']} CSV file(s) and "
        f"{counts['image']} image(s)")
  names = next((s.columns for s in sources if s.kind == "csv"), None)
  print(format_table(stats, names=names))
  for path, value in ((args.out, stats), (args.save_accumulator, acc)):
    if path:
      try:
        stats_io.save_stats(value, path)
      except OSError as error:
        raise InputError(f"{path}: cannot write ({cli_inputs.reason(error)})") from None
      print(f"wrote {path}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0 success, 1 bad input, 2 bad usage)."""
  args = build_parser().parse_args(argv)
  try:
    return run_stats(args)
  except InputError as error:
    print(f"jaxnorm {args.command}: error: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"jaxnorm {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as error:  # noqa: BLE001 - one line, never a traceback
    print(f"jaxnorm {args.command}: error: {cli_inputs.reason(error)}", file=sys.stderr)
    return 1
