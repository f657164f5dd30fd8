"""The inputs of ``jaxnorm stats``: .npy, .npz and CSV files and PNG/JPEG images, streamed.

A ``.npy`` file is memory-mapped (``mmap_mode='r'``) and read in chunks of about 32 MiB along its
first non-channel axis; each array of an ``.npz`` is decompressed chunk by chunk from the zip
member (an array in Fortran order, or chunked along an axis other than the first, is read
whole); a CSV file (one header line of column names, then numeric rows) is parsed in chunks of
rows, its columns the channels; images are read one at a time with Pillow as (height, width,
channels) arrays of their own dtype (uint8 for 8-bit images: exact quantiles), converted to
``--mode`` where one is given. Any problem raises :class:`InputError` with one line naming the
file and the flag that fixes it.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
CHUNK_BYTES = 32 * 2**20
IMAGE_MODES = ("RGB", "L", "RGBA")


class InputError(Exception):
  """A problem with the command's input, reported as one line."""


@dataclass
class Source:
  """One array or image to read: where it is, its shape, and how many chunks it gives."""
  path: str
  kind: str  # "npy", "npz", "csv" or "image"
  member: str | None = None
  columns: list[str] = field(default_factory=list)  # CSV: the numeric columns read
  column_index: list[int] = field(default_factory=list)
  shape: tuple[int, ...] | None = None
  dtype: np.dtype | None = None
  chunk_axis: int = 0
  rows_per_chunk: int = 1

  @property
  def name(self) -> str:
    return f"{self.path}[{self.member}]" if self.member else self.path

  @property
  def chunks(self) -> int:
    if self.kind in ("image", "csv"):
      return 1  # a CSV file's length is unknown before reading it
    return max(1, math.ceil(self.shape[self.chunk_axis] / self.rows_per_chunk))


def channel_axis_arg(text: str) -> int | None:
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
  if len(shape) == 1 and channel_axis is not None and shape[0] > 1:
    print(f"jaxnorm stats: warning: {source.name} is 1-d (shape {shape}): read as ONE row of "
          f"{shape[0]} channels, as fit_stats reads it; for {shape[0]} values of one feature "
          f"pass --channel-axis none (or save it as shape ({shape[0]}, 1))", file=sys.stderr)
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


def collect(paths: Sequence[str], channel_axis: int | None, keys: Sequence[str] | None,
            columns: Sequence[str] | None = None) -> list[Source]:
  """Every array and image named by ``paths`` (folders searched for images), checked."""
  sources = []
  for path in paths:
    if not os.path.exists(path):
      raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
      images = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                      for name in names if name.lower().endswith(IMAGE_SUFFIXES))
      if not images:
        arrays = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                        for name in names if name.lower().endswith(ARRAY_SUFFIXES))
        hint = ""
        if arrays:
          suffixes = sorted({os.path.splitext(a)[1].lower() for a in arrays})
          pattern = " ".join(os.path.join(path, f"*{s}") for s in suffixes)
          hint = (f"; it holds {len(arrays)} array file(s) ({', '.join(suffixes)}): folders are "
                  f"searched for images only, so pass the files themselves, e.g. "
                  f"jaxnorm stats {pattern}")
        raise InputError(f"{path}: folder holds no PNG or JPEG image{hint}")
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
        raise InputError(f"{path}: cannot read as .npy ({reason(error)})") from None
      sources.append(_plan_array(Source(path, "npy", shape=array.shape, dtype=array.dtype),
                                 channel_axis))
    elif suffix == ".npz":
      sources += _collect_npz(path, channel_axis, keys)
    elif suffix == ".csv":
      sources.append(_collect_csv(path, columns))
    else:
      raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r}; give .npy, .npz "
                       f"or .csv files, PNG or JPEG images, or folders of images")
  for kind, layout in (("image", "(height, width, channels)"), ("csv", "(rows, columns)")):
    if any(s.kind == kind for s in sources) and channel_axis not in (-1, None):
      raise InputError(f"{kind} files are read as {layout}; use --channel-axis -1 (the "
                       f"default), not {channel_axis}")
  if columns and not any(s.kind == "csv" for s in sources):
    raise InputError("--column picks columns of CSV files, but no .csv file is given")
  return sources


def _collect_csv(path: str, columns: Sequence[str] | None) -> Source:
  """A CSV file's numeric columns (from its header and first row), or those of ``columns``."""
  try:
    with open(path, newline="", encoding="utf-8") as file:
      reader = csv.reader(file)
      header = next(reader, None)
      first = next(reader, None)
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise InputError(f"{path}: cannot read as CSV ({reason(error)})") from None
  if not header:
    raise InputError(f"{path}: empty CSV file; give a header line of column names, then rows")
  header = [name.strip() for name in header]
  if all(_is_number(name) for name in header):
    raise InputError(f"{path}: the first line ({','.join(header[:4])}...) holds numbers, not "
                     f"column names; add a header line of column names")
  if first is None:
    raise InputError(f"{path}: no rows after the header; give rows of numbers")
  if len(first) != len(header):
    raise InputError(f"{path}: line 2 has {len(first)} fields but the header has {len(header)}")
  if columns:
    missing = [c for c in columns if c not in header]
    if missing:
      raise InputError(f"{path}: no column named {missing[0]!r}; it has {header}")
    chosen = [header.index(c) for c in columns]
    text = [header[i] for i in chosen if not _is_number(first[i])]
    if text:
      raise InputError(f"{path}: column {text[0]!r} holds text ({first[header.index(text[0])]!r} "
                       f"on line 2); pick numeric columns with --column")
  else:
    chosen = [i for i, value in enumerate(first) if _is_number(value)]
    if not chosen:
      raise InputError(f"{path}: no numeric column (line 2 is {first}); give numbers")
  skipped = [header[i] for i in range(len(header)) if i not in chosen]
  if skipped and not columns:
    print(f"jaxnorm stats: note: {path}: skipping non-numeric column(s) {skipped[:8]}",
          file=sys.stderr)
  return Source(path, "csv", columns=[header[i] for i in chosen], column_index=chosen,
                rows_per_chunk=max(1, CHUNK_BYTES // (8 * len(header))))


def _is_number(text: str) -> bool:
  if not text.strip():
    return True  # an empty field is a missing value (NaN)
  try:
    float(text)
  except ValueError:
    return False
  return True


def _csv_chunks(source: Source) -> Iterator[np.ndarray]:
  with open(source.path, newline="", encoding="utf-8") as file:
    reader = csv.reader(file)
    next(reader)  # the header
    index = source.column_index
    rows: list[list[float]] = []
    for line, fields in enumerate(reader, start=2):
      if not fields:
        continue
      try:
        rows.append([float(fields[i]) if fields[i].strip() else float("nan") for i in index])
      except (ValueError, IndexError):
        raise InputError(f"{source.path}: line {line} is not {len(index)} numbers in the columns "
                         f"{source.columns[:8]}: {fields[:8]}") from None
      if len(rows) == source.rows_per_chunk:
        yield np.array(rows)
        rows = []
    if rows:
      yield np.array(rows)


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
    raise InputError(f"{path}: cannot read as .npz ({reason(error)})") from None
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


def reason(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _read_image(path: str, mode: str | None = None) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as image:
      image.load()
      if mode is not None and image.mode != mode:
        image = image.convert(mode)
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
    raise InputError(f"{path}: cannot read as an image ({reason(error)})") from None
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


def batches(sources: Sequence[Source], channel_axis: int | None, state: dict,
            mode: str | None = None) -> Iterator[np.ndarray]:
  """Every chunk of every source, checking that channel counts agree (names the culprit)."""
  first = None
  for source in sources:
    state["source"] = source.name
    if source.kind == "image":
      chunks = iter([_read_image(source.path, mode)])
    elif source.kind == "csv":
      chunks = _csv_chunks(source)
    else:
      chunks = _array_chunks(source)
    try:
      for chunk in chunks:
        channels = 1 if channel_axis is None else chunk.shape[channel_axis]
        if first is None:
          first = (channels, source.name, source)
        elif channels != first[0]:
          raise InputError(f"{source.name} has {channels} channels but {first[1]} has "
                           f"{first[0]}; {_channel_hint(source, first[2])}")
        yield chunk
    except InputError:
      raise
    except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
      raise InputError(f"{source.name}: cannot read ({reason(error)})") from None


def _channel_hint(source: Source, first: Source) -> str:
  kinds = {source.kind, first.kind}
  if kinds == {"image"}:
    return ("convert every image to one mode with --mode RGB (grayscale and RGBA become RGB; "
            "ImageNet mixes them), or --mode L for grayscale")
  if "npz" in kinds and source.path == first.path:
    return (f"pick the arrays to fit with --key NAME (e.g. --key {first.member}); the others "
            f"(labels, say) are not data")
  if "npz" in kinds:
    return "pick the arrays of .npz files with --key NAME, or give inputs of one channel count"
  return "give inputs of one channel count, or set --channel-axis"


def check_out(path: str | None) -> None:
  """Fails before any fitting where ``--out`` cannot be written."""
  if not path:
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise InputError(f"--out {path} is a folder; give a file name such as {path}/stats.json")
  if not os.path.isdir(folder):
    raise InputError(f"--out {path}: the folder {os.path.dirname(path) or folder} does not "
                     f"exist; create it first (mkdir -p {os.path.dirname(path) or folder})")
  if not os.access(folder, os.W_OK):
    raise InputError(f"--out {path}: the folder {folder} is not writable")
