"""Command line: ``python -m jaxnorm stats PATH... [--channel-axis -1] [--out stats.json]``.

Fits exact per-channel statistics (:func:`jaxnorm.fit_stats`) over ``.npy`` and ``.npz`` files
and folders of PNG and JPEG images, prints a table and writes the JSON of ``Stats.save``.

It streams: a ``.npy`` file is memory-mapped (``mmap_mode='r'``) and read in chunks of about
32 MiB along its first non-channel axis; each array of an ``.npz`` is decompressed chunk by chunk
from the zip member (an array in Fortran order, or chunked along an axis other than the first, is
read whole); images are read one at a time with Pillow, as (height, width, channels) arrays of
their own dtype (uint8 for 8-bit images: exact quantiles). A problem with the input (a missing
or unreadable file, a folder without images, channel counts that differ, arrays without rows or
0-d arrays) prints one line on stderr and exits with status 1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from jaxnorm._src import dataset_stats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
CHUNK_BYTES = 32 * 2**20
TABLE_ROWS = 32


class InputError(Exception):
  """A problem with the command's input, reported as one line."""


@dataclass
class Source:
  """One array or image to read: where it is, its shape, and how many chunks it gives."""
  path: str
  kind: str  # "npy", "npz" or "image"
  member: str | None = None
  shape: tuple[int, ...] | None = None
  dtype: np.dtype | None = None
  chunk_axis: int = 0
  rows_per_chunk: int = 1

  @property
  def name(self) -> str:
    return f"{self.path}[{self.member}]" if self.member else self.path

  @property
  def chunks(self) -> int:
    if self.kind == "image":
      return 1
    return max(1, math.ceil(self.shape[self.chunk_axis] / self.rows_per_chunk))


def _channel_axis_arg(text: str) -> int | None:
  if text.lower() in ("none", "all"):
    return None
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _plan_array(source: Source, channel_axis: int | None) -> Source:
  """Checks the array's shape against channel_axis and picks the axis and size of chunks."""
  shape, dtype = source.shape, source.dtype
  if dtype.kind not in "biuf":
    raise InputError(f"{source.name}: dtype {dtype} is not a real number type")
  if not shape:
    raise InputError(f"{source.name}: a 0-d array (a single value, shape ()) has no rows; save "
                     f"arrays of shape (N, ...) with one row per example")
  if channel_axis is not None:
    if not -len(shape) <= channel_axis < len(shape):
      raise InputError(f"{source.name}: --channel-axis {channel_axis} is out of range for an "
                       f"array of shape {shape}")
    channel = channel_axis % len(shape)
  else:
    channel = None
  axes = [a for a in range(len(shape)) if a != channel]
  source.chunk_axis = axes[0] if axes else 0
  other = math.prod(s for a, s in enumerate(shape) if a != source.chunk_axis)
  source.rows_per_chunk = max(1, CHUNK_BYTES // max(1, other * dtype.itemsize))
  return source


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
  """Shape, Fortran order and dtype from the header of a .npy stream (left after the header)."""
  version = np.lib.format.read_magic(stream)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(stream)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(stream)
  return np.lib.format._read_array_header(stream, version)  # pylint: disable=protected-access


def _npz_member_header(archive: zipfile.ZipFile, member: str):
  with archive.open(member) as stream:
    return _read_header(stream)


def collect(paths: Sequence[str], channel_axis: int | None,
            keys: Sequence[str] | None) -> list[Source]:
  """Every array and image named by ``paths`` (folders searched for images), checked."""
  sources = []
  for path in paths:
    if not os.path.exists(path):
      raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
      images = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                      for name in names if name.lower().endswith(IMAGE_SUFFIXES))
      if not images:
        raise InputError(f"{path}: folder holds no PNG or JPEG image")
      sources += [Source(image, "image") for image in images]
      continue
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
      sources.append(Source(path, "image"))
    elif suffix == ".npy":
      try:
        with open(path, "rb") as file:
          if file.read(6) != b"\x93NUMPY":
            raise InputError(f"{path}: not a .npy file (no NumPy header)")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
      except InputError:
        raise
      except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
        raise InputError(f"{path}: cannot read as .npy ({_reason(error)})") from None
      sources.append(_plan_array(Source(path, "npy", shape=array.shape, dtype=array.dtype),
                                 channel_axis))
    elif suffix == ".npz":
      sources += _collect_npz(path, channel_axis, keys)
    else:
      raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r}; give .npy or .npz "
                       f"files, PNG or JPEG images, or folders of images")
  has_images = any(s.kind == "image" for s in sources)
  if has_images and channel_axis not in (-1, None):
    raise InputError(f"images are read as (height, width, channels); use --channel-axis -1 "
                     f"(the default), not {channel_axis}")
  return sources


def _collect_npz(path: str, channel_axis: int | None, keys: Sequence[str] | None) -> list[Source]:
  try:
    with zipfile.ZipFile(path) as archive:
      members = [m for m in archive.namelist() if m.endswith(".npy")]
      names = [m[:-4] for m in members]
      if keys:
        missing = [k for k in keys if k not in names]
        if missing:
          raise InputError(f"{path}: no array named {missing[0]!r}; it holds {names}")
        members = [m for m in members if m[:-4] in keys]
      headers = [(m, _npz_member_header(archive, m)) for m in members]
  except InputError:
    raise
  except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
    raise InputError(f"{path}: cannot read as .npz ({_reason(error)})") from None
  if not headers:
    raise InputError(f"{path}: holds no array")
  sources = []
  for member, (shape, fortran_order, dtype) in headers:
    source = _plan_array(Source(path, "npz", member=member[:-4], shape=shape, dtype=dtype),
                         channel_axis)
    if fortran_order or source.chunk_axis != 0:
      source.rows_per_chunk = shape[source.chunk_axis] or 1  # read whole
    sources.append(source)
  return sources


def _reason(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _read_image(path: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as image:
      image.load()
      mode = image.mode
      if mode == "1":
        image = image.convert("L")
      elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
      elif mode == "PA":
        image = image.convert("RGBA")
      elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
      array = np.asarray(image)
  except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
    raise InputError(f"{path}: cannot read as an image ({_reason(error)})") from None
  return array[..., None] if array.ndim == 2 else array


def _array_chunks(source: Source) -> Iterator[np.ndarray]:
  if source.kind == "npy":
    array = np.load(source.path, mmap_mode="r", allow_pickle=False)
    for start in range(0, max(1, array.shape[source.chunk_axis]), source.rows_per_chunk):
      index = [slice(None)] * array.ndim
      index[source.chunk_axis] = slice(start, start + source.rows_per_chunk)
      yield np.asarray(array[tuple(index)])
    return
  with zipfile.ZipFile(source.path) as archive, archive.open(source.member + ".npy") as stream:
    shape, fortran_order, dtype = _read_header(stream)
    if fortran_order or source.chunk_axis != 0:
      data = stream.read()
      yield np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")
      return
    row_shape = shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    for start in range(0, max(1, shape[0]), source.rows_per_chunk):
      rows = min(source.rows_per_chunk, shape[0] - start)
      data = stream.read(rows * row_bytes)
      if len(data) != rows * row_bytes:
        raise InputError(f"{source.name}: file is truncated")
      yield np.frombuffer(data, dtype).reshape((rows,) + row_shape)


def batches(sources: Sequence[Source], channel_axis: int | None,
            state: dict) -> Iterator[np.ndarray]:
  """Every chunk of every source, checking that channel counts agree (names the culprit)."""
  first = None
  for source in sources:
    state["source"] = source.name
    if source.kind == "image":
      chunks = iter([_read_image(source.path)])
    else:
      chunks = _array_chunks(source)
    try:
      for chunk in chunks:
        channels = 1 if channel_axis is None else chunk.shape[channel_axis]
        if first is None:
          first = (channels, source.name)
        elif channels != first[0]:
          raise InputError(
              f"{source.name} has {channels} channels but {first[1]} has {first[0]}; give "
              f"inputs with one channel count (convert images to one mode, e.g. RGB)")
        yield chunk
    except InputError:
      raise
    except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
      raise InputError(f"{source.name}: cannot read ({_reason(error)})") from None


def format_table(stats: dataset_stats.Stats, max_rows: int = TABLE_ROWS) -> str:
  """The statistics as a text table, one row per channel."""
  columns = ["count", "mean", "std", "min", "q25", "median", "q75", "max"]
  header = ["channel"] + columns
  rows = []
  for c in range(min(stats.channels, max_rows)):
    row = [str(c)]
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
      "stats", help="exact per-channel statistics of .npy/.npz files and image folders",
      description="Exact per-channel count, mean, std, var, min, max, median, q25 and q75 of "
                  ".npy/.npz files and folders of PNG/JPEG images, streamed.")
  stats.add_argument("paths", nargs="+", metavar="PATH",
                     help=".npy or .npz files, PNG or JPEG images, or folders of images")
  stats.add_argument("--channel-axis", type=_channel_axis_arg, default=-1,
                     help="axis of the arrays holding the channels (default -1; 'none' for one "
                          "channel over all values); images are (height, width, channels)")
  stats.add_argument("--out", metavar="JSON", help="write the statistics to this JSON file")
  stats.add_argument("--key", action="append", metavar="NAME",
                     help="only these arrays of .npz files (repeatable; default all)")
  stats.add_argument("--ignore-nan", action="store_true", help="skip NaNs instead of failing")
  stats.add_argument("--bins", type=int, default=dataset_stats.DEFAULT_BINS,
                     help="histogram bins per channel for the quantiles (default %(default)s)")
  stats.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
  return parser


def run_stats(args: argparse.Namespace) -> int:
  sources = collect(args.paths, args.channel_axis, args.key)
  if all(s.kind != "image" and math.prod(s.shape) == 0 for s in sources):
    shapes = "; ".join(f"{s.name} has shape {s.shape}" for s in sources[:4])
    raise InputError(f"no rows to fit: {shapes}; give arrays with at least one row")
  progress = sys.stderr.isatty() if args.progress is None else args.progress
  state: dict = {}
  try:
    stats = dataset_stats.fit_stats(
        batches(sources, args.channel_axis, state), channel_axis=args.channel_axis,
        ignore_nan=args.ignore_nan, bins=args.bins, progress=progress,
        total=sum(s.chunks for s in sources))
  except ValueError as error:
    where = state.get("source")
    raise InputError(f"{where}: {error}" if where else str(error)) from None
  arrays = sum(s.kind != "image" for s in sources)
  images = len(sources) - arrays
  print(f"{int(np.max(stats.count))} values per channel from {arrays} array(s) and "
        f"{images} image(s)")
  print(format_table(stats))
  if args.out:
    try:
      stats.save(args.out)
    except OSError as error:
      raise InputError(f"{args.out}: cannot write ({_reason(error)})") from None
    print(f"wrote {args.out}")
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
    print(f"jaxnorm {args.command}: error: {_reason(error)}", file=sys.stderr)
    return 1
