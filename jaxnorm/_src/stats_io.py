"""Dataset statistics as human-readable JSON: written exactly, validated on reading, never pickled.

The file is one JSON object::

  {
    "format": "jaxnorm.Stats",
    "version": 1,
    "channels": 3,
    "channel_axis": -1,
    "ignore_nan": false,
    "count": [50176, 50176, 50176],
    "mean": [123.68, 116.78, 103.94],
    ...
  }

with one list of ``channels`` numbers for each of ``count, mean, var, std, min, max, median,
q25, q75, quantile_error`` (the last four may be ``null``, all together, when the quantiles were
not fitted). Numbers are written with Python's shortest exact float repr, so loading gives back
the same float64 values. The histogram used for merging is not written.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxnorm._src import dataset_stats

FORMAT = "jaxnorm.Stats"
VERSION = 1
MOMENT_FIELDS = ("count", "mean", "var", "std", "min", "max")
QUANTILE_FIELDS = ("median", "q25", "q75", "quantile_error")
KEYS = ("format", "version", "channels", "channel_axis", "ignore_nan") + MOMENT_FIELDS + \
    QUANTILE_FIELDS
# Counts are stored as float64 when merged and checked: integers above 2**53 are not exact.
MAX_COUNT = 2**53


def _reject_constant(name: str):
  raise ValueError(f"holds {name}, which is not a number; every statistic must be finite")


def stats_to_dict(stats: dataset_stats.Stats) -> dict[str, Any]:
  """The JSON object for ``stats`` (plain Python lists of numbers), validated."""
  data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "channels": stats.channels,
                          "channel_axis": stats.channel_axis,
                          "ignore_nan": bool(stats.ignore_nan)}
  for name in MOMENT_FIELDS + QUANTILE_FIELDS:
    value = getattr(stats, name)
    if value is None:
      data[name] = None
    elif name == "count":
      count = np.asarray(value, np.float64)
      data[name] = [int(c) if np.isfinite(c) and c == int(c) else float(c) for c in count]
    else:
      data[name] = [float(v) for v in np.asarray(value, np.float64)]
  stats_from_dict(data, source="the statistics to save")
  return data


def stats_from_dict(data: Any, *, source: str = "stats") -> dataset_stats.Stats:
  """Validates a JSON object and returns the :class:`Stats` it holds; ValueError if malformed."""
  def fail(message: str):
    raise ValueError(f"{source}: {message}")

  if not isinstance(data, dict):
    fail(f"expected a JSON object written by Stats.save, got {type(data).__name__}")
  if data.get("format") != FORMAT:
    fail(f"'format' is {data.get('format')!r}, expected {FORMAT!r}; this is not a file written "
         f"by jaxnorm.Stats.save")
  if data.get("version") != VERSION:
    fail(f"'version' is {data.get('version')!r}; this jaxnorm reads version {VERSION}")
  missing = [k for k in ("channels", "channel_axis") + MOMENT_FIELDS + QUANTILE_FIELDS
             if k not in data]
  if missing:
    fail(f"missing key(s) {missing}; the file must hold every field written by Stats.save")
  unknown = sorted(str(k) for k in data if k not in KEYS)
  if unknown:
    fail(f"unknown key(s) {unknown}; a file written by Stats.save holds only {list(KEYS)}")
  channels = data["channels"]
  if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
    fail(f"'channels' must be a positive integer, got {channels!r}")
  channel_axis = data["channel_axis"]
  if channel_axis is not None and (not isinstance(channel_axis, int)
                                   or isinstance(channel_axis, bool)):
    fail(f"'channel_axis' must be an integer or null, got {channel_axis!r}")
  if channel_axis is None and channels != 1:
    fail(f"'channel_axis' is null (one channel over all values) but 'channels' is {channels}; "
         f"statistics of several channels need the integer channel axis they were fitted with")
  ignore_nan = data.get("ignore_nan", False)
  if not isinstance(ignore_nan, bool):
    fail(f"'ignore_nan' must be true or false, got {ignore_nan!r}")

  def numbers(name: str) -> np.ndarray:
    value = data[name]
    if not isinstance(value, list):
      fail(f"'{name}' must be a list of {channels} numbers, got {type(value).__name__}")
    if len(value) != channels:
      fail(f"'{name}' has {len(value)} values but 'channels' is {channels}; every statistic "
           f"needs one value per channel")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
      fail(f"'{name}' must hold only numbers, got {value!r}")
    try:
      array = np.asarray(value, np.float64)
    except (OverflowError, ValueError, TypeError) as error:  # an integer beyond float64
      fail(f"'{name}' holds a number that is not a float64 ({error}): {value!r}")
    if not np.all(np.isfinite(array)):
      fail(f"'{name}' holds a non-finite value (NaN or infinity): {value!r}")
    return array

  count = numbers("count")
  if np.any(count != np.round(count)) or np.any(count < 0) or np.any(count > MAX_COUNT):
    fail(f"'count' must hold positive integers no larger than 2**53, got {data['count']!r}")
  if np.any(count == 0):
    fail(f"channel(s) {np.flatnonzero(count == 0).tolist()[:8]} hold no value (count 0); "
         f"statistics need at least one value per channel")
  fields = {name: numbers(name) for name in MOMENT_FIELDS[1:]}
  fields["count"] = count.astype(np.int64)
  present = [name for name in QUANTILE_FIELDS if data[name] is not None]
  if present and len(present) != len(QUANTILE_FIELDS):
    fail(f"{present} are given but {sorted(set(QUANTILE_FIELDS) - set(present))} are null; "
         f"give all of median, q25, q75 and quantile_error, or none")
  fields.update({name: numbers(name) for name in present})
  if np.any(fields["var"] < 0):
    fail(f"'var' must not be negative, got {data['var']!r}")
  if not np.allclose(fields["std"], np.sqrt(fields["var"]), rtol=1e-6, atol=0):
    fail("'std' is not the square root of 'var'; the file was edited or corrupted")
  lo, hi = fields["min"], fields["max"]
  order = [("min", "max"), ("min", "mean"), ("mean", "max")]
  if present:
    order += [("min", "q25"), ("q25", "median"), ("median", "q75"), ("q75", "max")]
    if np.any(fields["quantile_error"] < 0):
      fail("'quantile_error' must not be negative")
  slack = 1e-12 * np.maximum(np.abs(lo), np.abs(hi))
  for low_name, high_name in order:
    if np.any(fields[low_name] > fields[high_name] + slack):
      channel = int(np.argmax(fields[low_name] > fields[high_name] + slack))
      fail(f"'{low_name}' exceeds '{high_name}' in channel {channel}; statistics must satisfy "
           f"min <= q25 <= median <= q75 <= max and min <= mean <= max")
  # Popoviciu: a variance is at most ((max - min) / 2)**2 (times n / (n - 1) if unbiased), so a
  # constant channel (min == max) has variance 0. The slack covers float64 rounding.
  magnitude = np.maximum(np.abs(lo), np.abs(hi))
  bound = np.square((hi - lo) / 2) * (count / np.maximum(count - 1, 1))
  too_wide = fields["var"] > bound * (1 + 1e-9) + np.square(1e-8 * magnitude)
  if np.any(too_wide):
    channel = int(np.argmax(too_wide))
    fail(f"'var' is {float(fields['var'][channel])!r} in channel {channel}, more than "
         f"((max - min) / 2)**2 * n / (n - 1) = {float(bound[channel])!r} allows for values in "
         f"[{float(lo[channel])!r}, {float(hi[channel])!r}]; the file was edited or corrupted")
  return dataset_stats.Stats(**fields, channel_axis=channel_axis, ignore_nan=ignore_nan)


def save_stats(stats: dataset_stats.Stats, path: str | os.PathLike) -> None:
  """Writes ``stats`` to ``path`` as indented JSON (exact float64 values; no histogram).

  Example:
    >>> import os, tempfile, numpy as np, jaxnorm
    >>> stats = jaxnorm.fit_stats(np.array([[0.0, 1.0], [2.0, 5.0]]))
    >>> path = os.path.join(tempfile.mkdtemp(), "stats.json")
    >>> stats.save(path)
    >>> jaxnorm.Stats.load(path).mean
    array([1., 3.])
  """
  data = stats_to_dict(stats)
  text = json.dumps(data, indent=2, allow_nan=False)
  with open(path, "w", encoding="utf-8") as file:
    file.write(text + "\n")


def load_stats(path: str | os.PathLike) -> dataset_stats.Stats:
  """Reads statistics written by :func:`save_stats`, checking every field.

  Raises:
    ValueError: the file is not JSON, a key is missing or unknown, a list has the wrong length,
      a value is NaN, infinite or not a number, a count is not an integer from 0 to 2**53,
      channel_axis is null for several channels, or the statistics contradict each other (say
      min > max, or a variance wider than [min, max] allows).
    OSError: the file cannot be read.
  """
  source = os.fspath(path)
  with open(path, "rb") as file:
    raw = file.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{source}: not a UTF-8 text file; give a JSON file written by "
                     f"Stats.save") from None
  try:
    data = json.loads(text, parse_constant=_reject_constant)
  except json.JSONDecodeError as error:
    raise ValueError(f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column "
                     f"{error.colno}); give a file written by Stats.save") from None
  except ValueError as error:
    raise ValueError(f"{source}: {error}") from None
  return stats_from_dict(data, source=source)

