"""``python -m jaxnorm stats`` run as a subprocess: statistics against float64 NumPy, and one
line on stderr with a non-zero exit (never a traceback) for each kind of bad input (most of them
through ``cli.main`` in process, which is all ``python -m jaxnorm`` runs)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jaxnorm
from jaxnorm._src import cli
from jaxnorm._src import cli_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd):
  return subprocess.run([sys.executable, "-m", "jaxnorm", "stats", *map(str, args)],
                        capture_output=True, text=True, timeout=120, cwd=cwd,
                        env={**os.environ, "PYTHONPATH": ROOT})


def assert_matches(stats_json, values):
  """values: (n, C) float64 reference data."""
  data = json.loads(stats_json.read_text())
  np.testing.assert_array_equal(data["count"], [len(values)] * values.shape[1])
  np.testing.assert_allclose(data["mean"], values.mean(0), rtol=1e-9)
  np.testing.assert_allclose(data["var"], values.var(0), rtol=1e-9)
  np.testing.assert_allclose(data["std"], values.std(0), rtol=1e-9)
  np.testing.assert_array_equal(data["min"], values.min(0))
  np.testing.assert_array_equal(data["max"], values.max(0))
  for name, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):  # within the rank bound
    found = np.array(data[name])
    low, high = np.mean(values < found, axis=0), np.mean(values <= found, axis=0)
    gap = np.maximum(np.maximum(low - q, q - high), 0)
    assert np.all(gap <= np.array(data["quantile_error"]) + 1 / len(values)), (name, gap)
  return data


def test_npy_and_npz_files_streamed(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((3000, 3)) * [1, 10, 100] + 1e4).astype(np.float32)
  b = rng.standard_normal((700, 3))
  np.save(tmp_path / "a.npy", a)
  np.savez_compressed(tmp_path / "b.npz", x=b, labels=np.arange(700))
  result = run("a.npy", "b.npz", "--key", "x", "--out", "stats.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert "median" in result.stdout and "wrote stats.json" in result.stdout
  values = np.concatenate([a.astype(np.float64), b])
  assert_matches(tmp_path / "stats.json", values)
  assert jaxnorm.Stats.load(tmp_path / "stats.json").channels == 3
  # In-process, with tiny chunks: the same numbers from many chunks of both kinds of file.
  monkeypatch.setattr(cli_inputs, "CHUNK_BYTES", 1000)
  monkeypatch.chdir(tmp_path)
  assert cli.main(["stats", "a.npy", "b.npz", "--key", "x", "--out", "chunked.json"]) == 0
  chunked = json.loads((tmp_path / "chunked.json").read_text())
  whole = json.loads((tmp_path / "stats.json").read_text())
  np.testing.assert_allclose(chunked["mean"], whole["mean"], rtol=1e-12)
  np.testing.assert_allclose(chunked["var"], whole["var"], rtol=1e-12)


def test_channel_axis_option(tmp_path):
  x = np.random.default_rng(1).standard_normal((6, 2, 50))  # (N, C, L)
  np.save(tmp_path / "x.npy", x)
  result = run("x.npy", "--channel-axis", "1", "--out", "s.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert_matches(tmp_path / "s.json", np.moveaxis(x, 1, -1).reshape(-1, 2))
  result = run("x.npy", "--channel-axis", "none", "--out", "all.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert_matches(tmp_path / "all.json", x.reshape(-1, 1))


def test_image_folder_png_and_jpeg(tmp_path):
  rng = np.random.default_rng(2)
  (tmp_path / "images" / "more").mkdir(parents=True)
  arrays = []
  for i in range(3):
    pixels = rng.integers(0, 256, (12 + i, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    arrays.append(pixels)
  Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
      tmp_path / "images" / "more" / "x.JPG")
  arrays.append(np.asarray(Image.open(tmp_path / "images" / "more" / "x.JPG")))  # decoded
  (tmp_path / "images" / "notes.txt").write_text("not an image")
  result = run("images", "--out", "s.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "4 image(s)" in result.stdout
  values = np.concatenate([a.reshape(-1, 3) for a in arrays]).astype(np.float64)
  data = assert_matches(tmp_path / "s.json", values)
  np.testing.assert_array_equal(data["median"], np.median(values, axis=0))  # uint8: exact
  np.testing.assert_array_equal(data["quantile_error"], 0)


def test_grayscale_images_have_one_channel(tmp_path):
  (tmp_path / "gray").mkdir()
  pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
  Image.fromarray(pixels).save(tmp_path / "gray" / "g.png")
  result = run("gray", "--out", "s.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert_matches(tmp_path / "s.json", pixels.reshape(-1, 1).astype(np.float64))


def make_bad_inputs(path):
  rng = np.random.default_rng(3)
  (path / "empty").mkdir()
  (path / "mixed").mkdir()
  Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(path / "mixed" / "a.png")
  Image.fromarray(rng.integers(0, 256, (5, 5, 4), dtype=np.uint8)).save(path / "mixed" / "b.png")
  (path / "broken.npy").write_bytes(b"not a numpy file")
  np.save(path / "good.npy", np.ones((4, 3)))
  (path / "truncated.npy").write_bytes((path / "good.npy").read_bytes()[:-40])
  (path / "broken.png").write_bytes(b"\x89PNG garbage")
  (path / "broken.npz").write_bytes(b"PK not a zip")
  (path / "notes.txt").write_text("hello")
  np.save(path / "other.npy", np.ones((4, 5)))
  np.save(path / "nan.npy", np.array([[1.0, np.nan]]))
  np.save(path / "no_rows.npy", np.zeros((0, 3)))
  np.savez(path / "no_rows.npz", x=np.zeros((0, 3), np.float32))
  np.save(path / "scalar.npy", np.array(5.0))
  np.save(path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


BAD = {
    "missing file": (["missing.npy"], "missing.npy: no such file or folder"),
    "empty folder": (["empty"], "empty: folder holds no PNG or JPEG image"),
    "mixed channels": (["mixed"], "mixed/b.png has 4 channels but mixed/a.png has 3; convert "
                       "every image to one mode with --mode RGB"),
    "mixed arrays": (["good.npy", "other.npy"], "other.npy has 5 channels but good.npy has 3"),
    "not a npy": (["broken.npy"], "broken.npy: not a .npy file"),
    "truncated npy": (["truncated.npy"], "truncated.npy: cannot read as .npy"),
    "pickled npy": (["objects.npy"], "objects.npy: cannot read as .npy"),
    "broken png": (["broken.png"], "broken.png: cannot read as an image"),
    "broken npz": (["broken.npz"], "broken.npz: cannot read as .npz"),
    "unsupported": (["notes.txt"], "notes.txt: unsupported file type '.txt'; give .npy, .npz "
                    "or .csv files"),
    "channel axis": (["good.npy", "--channel-axis", "3"], "--channel-axis 3 is out of range"),
    "nan": (["nan.npy"], "NaN in channel\\(s\\) \\[1\\]; skip NaNs with --ignore-nan, or"),
    "npz key": (["good.npy", "broken.npz", "--key", "x"], "broken.npz: cannot read"),
    "no rows": (["no_rows.npy", "no_rows.npz"],
                r"no rows to fit: no_rows.npy has shape \(0, 3\); no_rows.npz\[x\] has shape"),
    "0-d, channel axis none": (
        ["scalar.npy", "--channel-axis", "none"],
        r"scalar.npy: a 0-d array \(a single value, shape \(\)\) has no rows"),
    "0-d": (["scalar.npy"], r"scalar.npy: a 0-d array"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad")
  make_bad_inputs(path)
  return path


def run_in_process(*args, cwd, monkeypatch, capsys):
  """``run``'s result from ``cli.main`` in this process: what ``python -m jaxnorm`` exits with
  (``raise SystemExit(main())``), without starting Python and JAX again for each case. An
  exception that escapes ``main`` escapes here too, and fails the test as a traceback would."""
  monkeypatch.chdir(cwd)
  capsys.readouterr()
  try:
    returncode = cli.main(["stats", *map(str, args)])
  except SystemExit as exit_:
    returncode = exit_.code
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(args, returncode, out, err)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_nonzero_exit(bad_inputs, case, monkeypatch, capsys):
  """Each bad input in process; one of them through a real ``python -m jaxnorm`` process, whose
  whole stderr must be that one line too."""
  args, message = BAD[case]
  if case == "missing file":
    result = run(*args, cwd=bad_inputs)
  else:
    result = run_in_process(*args, cwd=bad_inputs, monkeypatch=monkeypatch, capsys=capsys)
  assert result.returncode == 1, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("jaxnorm stats: error: ")
  assert re.search(message, lines[0]), lines[0]


def test_bad_usage_exits_2_without_traceback(tmp_path):
  result = run(cwd=tmp_path)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "the following arguments are required: PATH" in result.stderr


def test_ignore_nan_option(tmp_path):
  x = np.array([[1.0, np.nan], [3.0, 4.0], [5.0, 8.0]])
  np.save(tmp_path / "nan.npy", x)
  result = run("nan.npy", "--ignore-nan", "--out", "s.json", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  data = json.loads((tmp_path / "s.json").read_text())
  assert data["count"] == [3, 2] and data["mean"] == [3.0, 6.0]


def test_table_lists_at_most_32_channels():
  stats = jaxnorm.fit_stats(np.random.default_rng(4).standard_normal((10, 40)))
  table = cli.format_table(stats)
  assert len(table.splitlines()) == 1 + 32 + 1 and "8 more channels" in table


# --- in-process (fast): CSV, --mode, the user-facing messages, --workers -----------------------


def stats_main(*args):
  return cli.main(["stats", *map(str, args)])


def test_csv_numeric_columns_with_a_header(tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(5)
  values = np.round(rng.standard_normal((500, 2)) * [1, 100] + [5, 1e4], 6)
  lines = ["height,species,weight"] + [f"{float(a)!r},cat,{float(b)!r}" for a, b in values]
  (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli_inputs, "CHUNK_BYTES", 2400)  # chunks of 100 rows
  assert stats_main("t.csv", "--out", "s.json") == 0
  out, err = capsys.readouterr()
  assert "skipping non-numeric column(s) ['species']" in err
  assert "height" in out and "weight" in out and "1 CSV file(s)" in out
  data = assert_matches(tmp_path / "s.json", values)
  np.testing.assert_allclose(data["median"], np.median(values, 0), rtol=1e-12)  # 500: exact
  assert stats_main("t.csv", "--column", "weight", "--out", "w.json") == 0
  np.testing.assert_allclose(json.loads((tmp_path / "w.json").read_text())["mean"],
                             [values[:, 1].mean()], rtol=1e-12)


def test_mode_rgb_converts_a_folder_mixing_grayscale_and_colour(tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(6)
  (tmp_path / "mixed").mkdir()
  gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
  rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  rgba = rng.integers(0, 256, (3, 3, 4), dtype=np.uint8)
  for name, pixels in (("g.png", gray), ("c.png", rgb), ("a.png", rgba)):
    Image.fromarray(pixels).save(tmp_path / "mixed" / name)
  monkeypatch.chdir(tmp_path)
  assert stats_main("mixed") == 1
  assert "--mode RGB" in capsys.readouterr().err
  assert stats_main("mixed", "--mode", "RGB", "--out", "s.json") == 0
  expected = np.concatenate([np.asarray(Image.open(tmp_path / "mixed" / n).convert("RGB"))
                             .reshape(-1, 3) for n in ("a.png", "c.png", "g.png")])
  data = assert_matches(tmp_path / "s.json", expected.astype(np.float64))
  np.testing.assert_array_equal(data["quantile_error"], 0)


def test_user_facing_messages_name_the_flag_that_fixes_them(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "arrays").mkdir()
  np.save(tmp_path / "arrays" / "a.npy", np.ones((3, 2)))
  np.savez(tmp_path / "d.npz", x=np.ones((4, 3)), labels=np.arange(4))
  np.save(tmp_path / "ok.npy", np.ones((4, 3)))
  (tmp_path / "nohead.csv").write_text("1,2\n3,4\n")
  (tmp_path / "text.csv").write_text("a,b\n1,x\n")
  cases = {
      ("arrays",): r"holds no PNG or JPEG image; it holds 1 array file\(s\) \(.npy\).*pass "
                   r"the files themselves, e.g. jaxnorm stats arrays/\*.npy",
      ("d.npz",): r"d.npz\[labels\] has 4 channels but d.npz\[x\] has 3; pick the arrays to "
                  r"fit with --key NAME \(e.g. --key x\)",
      ("ok.npy", "--out", "missing/s.json"): r"--out missing/s.json: the folder missing does not "
                                             r"exist; create it first \(mkdir -p missing\)",
      ("ok.npy", "--sketch-k", "2"): r"--sketch-k 2 must lie in \[8, 65535\]",
      ("nohead.csv",): r"nohead.csv: the first line \(1,2...\) holds numbers, not column names",
      ("text.csv", "--column", "b"): r"text.csv: column 'b' holds text",
      ("ok.npy", "--column", "b"): r"--column picks columns of CSV files",
      ("ok.npy", "--workers", "0"): r"--workers 0 must be at least 1",
  }
  for args, message in cases.items():
    assert stats_main(*args) == 1, args
    out, err = capsys.readouterr()
    assert re.search(message, err), (args, err)
    assert "values per channel" not in out  # failed before fitting


def test_a_1d_array_warns_and_channel_axis_none_reads_n_values(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  np.save(tmp_path / "v.npy", np.arange(6.0))
  assert stats_main("v.npy") == 0
  assert "read as ONE row of 6 channels" in capsys.readouterr().err
  assert stats_main("v.npy", "--channel-axis", "none", "--out", "s.json") == 0
  assert json.loads((tmp_path / "s.json").read_text())["count"] == [6]


def test_workers_and_saved_accumulator_equal_one_process(tmp_path, monkeypatch):
  rng = np.random.default_rng(7)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "images").mkdir()
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (8, 7, 3), dtype=np.uint8)).save(
        tmp_path / "images" / f"{i}.png")
  assert stats_main("images", "--out", "one.json", "--save-accumulator", "acc.json") == 0
  assert stats_main("images", "--workers", "2", "--out", "two.json") == 0
  one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
  for name in ("count", "min", "max", "median", "q25", "q75", "percentiles"):
    assert one[name] == two[name], name
  np.testing.assert_allclose(one["mean"], two["mean"], rtol=1e-12)
  acc = jaxnorm.load_accumulator(tmp_path / "acc.json")
  np.testing.assert_array_equal(acc.result().median, one["median"])
