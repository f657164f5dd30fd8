"""Speed of every jaxnorm layer against a plain memory pass, flax.linen and PyTorch.

For each op and shape of ``BENCHMARKING.md``, forward and forward+backward under ``jax.jit``:
jaxnorm's time, its multiple of a plain memory pass over the same array (``x * a + b``: read x,
write y; for forward+backward two such passes, 4N bytes), flax.linen's multiple (default, and
``use_fast_variance=False``), PyTorch's multiple of its own memory pass where it is installed,
XLA's planned bytes over the minimum, and compile times.

Every library runs in a worker process of its own (PyTorch's OpenMP threads and XLA's pool spin
against each other in one), the workers take turns round by round, and each figure is the median
over rounds of the per-round ratio to the same worker's memory pass.

With ``--baseline DIR`` another worker imports jaxnorm from ``DIR`` (another checkout, e.g.
``git worktree add /tmp/before HEAD~1``) and times it in the same rounds: a second table shows
both versions side by side, with their ratio and both planned-byte counts. With
``--reference-paths`` a worker times jaxnorm with ``JAXNORM_KERNELS=reference`` the same way:
what the fast paths of ``jaxnorm/_src/fast/`` gain over the reference path.

Run: python benchmarks/speed.py [--quick] [--rounds 5] [--only layer_norm,...] [--readme]
     [--baseline DIR] [--reference-paths]
(--readme writes the table into docs/guides/performance.md.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.arena_max=1")

ROWS = [(256, 1024), (8192, 1024), (4096, 4096)]
IMAGES = [(64, 32, 32, 64), (32, 56, 56, 128)]
CASES = (
    [("layer_norm", s) for s in ROWS] + [("rms_norm", s) for s in ROWS]
    + [(op, s) for op in ("batch_norm", "batch_renorm", "group_norm", "instance_norm")
       for s in IMAGES]
    + [("standardize", (8192, 1024)), ("standardize_uint8", (256, 224, 224, 3))])
QUICK_CASES = [("layer_norm", (256, 1024)), ("rms_norm", (256, 1024)),
               ("batch_norm", (8, 8, 8, 64)), ("batch_renorm", (8, 8, 8, 64)),
               ("group_norm", (8, 8, 8, 64)), ("instance_norm", (8, 8, 8, 64)),
               ("standardize", (256, 1024)), ("standardize_uint8", (8, 32, 32, 3))]
MODES = ("fwd", "fwd+bwd")
PEERS = ("jaxnorm", "flax", "flax_two_pass")

# ---------------------------------------------------------------------------------------------
# The JAX worker: memory pass, jaxnorm, flax.linen.


def jax_functions(op, shape, mode, peers=PEERS):
  """{name: (jitted fn, args)} for the memory pass and every JAX library in ``peers`` that has
  ``op`` (a worker that times jaxnorm alone builds no flax layer)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxnorm
  import jaxnorm.linen as jnn

  rng = np.random.default_rng(0)
  if op == "standardize_uint8":
    x = jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))
  else:
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

  def layers(kind):
    flax_kw = lambda fast: {"use_fast_variance": fast}  # noqa: E731
    if op == "layer_norm":
      return {"jaxnorm": jnn.LayerNorm(), "flax": nn.LayerNorm(**flax_kw(True)),
              "flax_two_pass": nn.LayerNorm(**flax_kw(False))}[kind]
    if op == "rms_norm":
      return {"jaxnorm": jnn.RMSNorm(), "flax": nn.RMSNorm(),
              "flax_two_pass": None}[kind]
    if op == "batch_norm":
      return {"jaxnorm": jnn.BatchNorm(use_running_average=False),
              "flax": nn.BatchNorm(use_running_average=False, **flax_kw(True)),
              "flax_two_pass": nn.BatchNorm(use_running_average=False, **flax_kw(False))}[kind]
    if op == "batch_renorm":
      return jnn.BatchRenorm(use_running_average=False) if kind == "jaxnorm" else None
    if op == "group_norm":
      return {"jaxnorm": jnn.GroupNorm(num_groups=32),
              "flax": nn.GroupNorm(num_groups=32, **flax_kw(True)),
              "flax_two_pass": nn.GroupNorm(num_groups=32, **flax_kw(False))}[kind]
    if op == "instance_norm":
      return {"jaxnorm": jnn.InstanceNorm(), "flax": nn.InstanceNorm(**flax_kw(True)),
              "flax_two_pass": nn.InstanceNorm(**flax_kw(False))}[kind]
    return None

  functions = {}
  cotangent = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  a, b = jnp.float32(1.5), jnp.float32(0.25)
  if mode == "fwd":
    functions["memory"] = (jax.jit(lambda x: x.astype(jnp.float32) * a + b), (x,))
  else:
    functions["memory"] = (jax.jit(lambda x, g: (x * a + b, g * b + a)), (x, cotangent))

  if op.startswith("standardize"):
    axes = tuple(range(x.ndim - 1))
    mean, var = jax.jit(jaxnorm.moments, static_argnums=1)(x, axes)
    functions["jaxnorm"] = (jax.jit(lambda x: jaxnorm.normalize(x.astype(jnp.float32), mean, var)),
                            (x,))
    return functions

  for kind in peers:
    layer = layers(kind)
    if layer is None:
      continue
    # Initialized under jit: one small compile instead of an eager forward pass op by op.
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(state)

    def forward(params, x, layer=layer, state=state, mutable=mutable):
      if mutable:
        return layer.apply({"params": params, **state}, x, mutable=mutable)
      return layer.apply({"params": params}, x), state

    if mode == "fwd":
      functions[kind] = (jax.jit(forward), (params, x))
    else:
      def step(params, x, g, forward=forward):
        def loss(p, x):
          y, new_state = forward(p, x)
          return jnp.vdot(y, g), new_state
        (_, new_state), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return grads, new_state
      functions[kind] = (jax.jit(step), (params, x, cotangent))
  return functions


def planned_bytes(fn, args):
  """XLA's planned bytes for one call (cost_analysis), or None where it does not say."""
  try:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["bytes accessed"])
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def jax_worker():
  import jax

  cache = {}
  for line in sys.stdin:
    request = json.loads(line)
    key = (request["op"], tuple(request["shape"]), request["mode"])
    reply = {}
    if key not in cache:
      role = os.environ.get("JAXNORM_BENCH_ROLE")  # another checkout's or mode's jaxnorm
      functions = jax_functions(*key, peers=("jaxnorm",) if role else PEERS)
      if role:
        functions = {"memory": functions["memory"], role: functions["jaxnorm"]}
      info = {}
      for name, (fn, args) in functions.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        info[name] = {"compile_s": time.perf_counter() - start,
                      "bytes": planned_bytes(fn, args)}
      cache[key] = functions
      reply["info"] = info
    functions = cache[key]
    reply["times"] = time_interleaved(
        {name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
         for name, (fn, args) in functions.items()}, request["calls"])
    print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------
# The PyTorch worker: its memory pass and torch.nn.functional.


def torch_functions(op, shape, mode):
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  channels = shape[-1]
  if op == "standardize_uint8":
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
  else:
    x = torch.randn(shape)
  channels_last = len(shape) == 4 and not op.startswith("standardize")
  if channels_last:  # NHWC in memory, as the JAX arrays: channels_last NCHW views
    x = x.permute(0, 3, 1, 2)
  g = torch.randn(x.shape)
  if channels_last:
    g = g.contiguous(memory_format=torch.channels_last)
  weight, bias = torch.ones(channels), torch.zeros(channels)
  running_mean, running_var = torch.zeros(channels), torch.ones(channels)

  norms = {
      "layer_norm": lambda x, w, b: F.layer_norm(x, (channels,), w, b, 1e-6),
      "rms_norm": lambda x, w, b: F.rms_norm(x, (channels,), w, 1e-6),
      "batch_norm": lambda x, w, b: F.batch_norm(x, running_mean, running_var, w, b, True,
                                                 0.01, 1e-5),
      "group_norm": lambda x, w, b: F.group_norm(x, 32, w, b, 1e-6),
      "instance_norm": lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-6),
  }
  functions = {}
  # One read and one write per pass, as XLA's fused x * a + b: addcmul with 0-d tensors for a
  # and b runs about 15% slower than this on CPU, which flattered PyTorch's multiples.
  if mode == "fwd":
    functions["memory"] = (lambda: x.to(torch.float32)) if x.dtype == torch.uint8 else (
        lambda: torch.add(x, 0.25))
  else:
    functions["memory"] = lambda: (torch.add(x, 0.25), torch.add(g, 1.5))
  if op.startswith("standardize"):
    if mode == "fwd":
      mean, inv = torch.full((channels,), 0.5), torch.full((channels,), 2.0)
      # one fused op: (x - mean) * inv = x * inv - mean * inv
      shift = -mean * inv
      functions["torch"] = lambda: torch.addcmul(shift, x.float() if x.dtype == torch.uint8
                                                 else x, inv)
    return functions
  if op not in norms:
    return functions
  norm = norms[op]
  if mode == "fwd":
    def forward():
      with torch.no_grad():
        return norm(x, weight, bias)
    functions["torch"] = forward
  else:
    xg = x.detach().clone().requires_grad_(True)
    wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)

    def step():
      xg.grad = wg.grad = bg.grad = None
      norm(xg, wg, bg).backward(g)
      return xg.grad
    functions["torch"] = step
  return functions


def torch_worker():
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  cache = {}
  for line in sys.stdin:
    request = json.loads(line)
    key = (request["op"], tuple(request["shape"]), request["mode"])
    if key not in cache:
      cache[key] = torch_functions(*key)
      for fn in cache[key].values():
        fn()
    print(json.dumps({"times": time_interleaved(cache[key], request["calls"])}), flush=True)


def time_interleaved(functions, calls):
  """Median seconds per call of each function, timed in turns that rotate (A B C, B C A, ...).

  Rotating matters: a function timed right after the memory pass, which leaves the cache full
  of its freshly written output, ran up to 1.4 times slower on 16 MiB arrays here.
  """
  samples = {name: [] for name in functions}
  names = list(functions)
  for call in range(calls):
    for name in names[call % len(names):] + names[:call % len(names)]:
      start = time.perf_counter()
      functions[name]()
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in samples.items()}


# ---------------------------------------------------------------------------------------------
# The driver: workers in turns, ratios per round, medians, a table.


class Worker:
  def __init__(self, kind, baseline=None, role=None, **environment):
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, OMP_WAIT_POLICY="PASSIVE",
               **environment)
    if role:
      env.update(JAXNORM_BENCH_ROLE=role)
    if baseline:
      env.update(PYTHONPATH=os.path.abspath(baseline))
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", kind], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env,
        cwd=os.path.abspath(baseline) if baseline else None)

  def ask(self, op, shape, mode, calls):
    self.process.stdin.write(json.dumps({"op": op, "shape": shape, "mode": mode,
                                         "calls": calls}) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker exited (code {self.process.wait()})")
    return json.loads(line)

  def close(self):
    self.process.stdin.close()
    self.process.wait(timeout=60)


def torch_available():
  try:
    import importlib.util
    return importlib.util.find_spec("torch") is not None
  except Exception:  # noqa: BLE001
    return False


QUICK_CALLS = 20  # --quick: calls per function and round (it checks the table, not the speed)


def calls_for(shape, most=200):
  size = 1
  for n in shape:
    size *= n
  return max(min(10, most), min(most, int(2e8 / (size * 4))))


def measure(cases, rounds, use_torch, baseline=None, reference_paths=False, most_calls=200):
  workers = {"jax": Worker("jax")}
  if baseline:
    workers["baseline"] = Worker("jax", baseline, role="baseline")
  if reference_paths:
    workers["reference"] = Worker("jax", role="reference", JAXNORM_KERNELS="reference")
  if use_torch:
    workers["torch"] = Worker("torch")
  results = []
  try:
    for op, shape in cases:
      for mode in MODES:
        if op.startswith("standardize") and mode != "fwd":
          continue  # fitted statistics are constants: there is no backward to time
        ratios, info = {}, {}
        calls = calls_for(shape, most_calls)
        for _ in range(rounds):
          for kind, worker in workers.items():
            reply = worker.ask(op, list(shape), mode, calls)
            info.update({f"{kind}:{k}": v for k, v in reply.get("info", {}).items()})
            times = reply["times"]
            for name, seconds in times.items():
              if name != "memory":
                ratios.setdefault(name, []).append(seconds / times["memory"])
            ratios.setdefault(f"{kind}:memory_ms", []).append(1e3 * times["memory"])
        if len(ratios) <= len(workers):  # nothing but memory passes: op has no backward here
          continue
        results.append({"op": op, "shape": shape, "mode": mode, "info": info,
                        **{k: statistics.median(v) for k, v in ratios.items()}})
        print(f"  measured {op} {shape} {mode}", file=sys.stderr, flush=True)
  finally:
    for worker in workers.values():
      worker.close()
  return results


def element_bytes(op):
  return 1 if op == "standardize_uint8" else 4


def versus_table(results, role, names=("before", "after")):
  """jaxnorm against the ``role`` worker's (``--baseline``, ``--reference-paths``)."""
  first, second = names
  lines = [f"| op | shape | pass | {first} × mem | {second} × mem | {second} / {first} | "
           f"XLA bytes / min {first} | {second} |", "|---" * 8 + "|"]
  for r in results:
    size = 1
    for n in r["shape"]:
      size *= n
    minimum = size * (element_bytes(r["op"]) + 4) if r["mode"] == "fwd" else 16 * size
    planned = [r["info"].get(key, {}).get("bytes") for key in (f"{role}:{role}", "jax:jaxnorm")]
    planned = [f"{p / minimum:.2f}" if p else "-" for p in planned]
    lines.append(
        f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | {r[role]:.2f} | "
        f"{r['jaxnorm']:.2f} | {r['jaxnorm'] / r[role]:.2f} | {planned[0]} | "
        f"{planned[1]} |")
  return "\n".join(lines)


def table(results):
  head = ("| op | shape | pass | jaxnorm × mem | flax × mem | flax two-pass × mem | "
          "torch × mem | jaxnorm / flax | XLA bytes / min | compile ms |")
  lines = [head, "|---" * 10 + "|"]
  for r in results:
    size = 1
    for n in r["shape"]:
      size *= n
    minimum = size * (element_bytes(r["op"]) + 4) if r["mode"] == "fwd" else 16 * size
    planned = r["info"].get("jax:jaxnorm", {}).get("bytes")
    compile_ms = r["info"].get("jax:jaxnorm", {}).get("compile_s")
    cell = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
    versus = f"{r['jaxnorm'] / r['flax']:.2f}" if "flax" in r else "-"
    lines.append(
        f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | {cell('jaxnorm')} | "
        f"{cell('flax')} | {cell('flax_two_pass')} | {cell('torch')} | {versus} | "
        f"{planned / minimum:.2f} | {1e3 * compile_ms:.0f} |" if planned else
        f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | {cell('jaxnorm')} | "
        f"{cell('flax')} | {cell('flax_two_pass')} | {cell('torch')} | {versus} | - | "
        f"{1e3 * (compile_ms or 0):.0f} |")
  return "\n".join(lines)


def machine():
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{cpu}, {os.cpu_count()} cores, {jax.devices()[0].platform}, jax {jax.__version__}, "
          f"python {platform.python_version()}")


def update_readme(text):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "guides",
                      "performance.md")
  with open(path) as f:
    readme = f.read()
  start, end = "<!-- speed-table:start -->", "<!-- speed-table:end -->"
  if start not in readme:
    raise SystemExit(f"{path} has no {start} marker")
  before, rest = readme.split(start, 1)
  _, after = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{before}{start}\n{text}\n{end}{after}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help=f"small shapes, one round, {QUICK_CALLS} calls per function")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--only", default="", help="comma-separated ops")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--readme", action="store_true", help="write the table into docs/guides/performance.md")
  parser.add_argument("--baseline", metavar="DIR",
                      help="also time the jaxnorm of this checkout, side by side")
  parser.add_argument("--reference-paths", action="store_true",
                      help="also time jaxnorm with JAXNORM_KERNELS=reference, side by side")
  args = parser.parse_args(argv)
  if args.worker == "jax":
    return jax_worker()
  if args.worker == "torch":
    return torch_worker()
  cases = QUICK_CASES if args.quick else CASES
  if args.only:
    cases = [c for c in cases if c[0] in args.only.split(",")]
  use_torch = not args.no_torch and torch_available()
  if not use_torch:
    print("PyTorch " + ("left out (--no-torch)" if args.no_torch else "is not installed")
          + ": its column is left empty (pip install torch==2.13.0 for a CPU build)",
          file=sys.stderr)
  results = measure(cases, 1 if args.quick else args.rounds, use_torch, args.baseline,
                    args.reference_paths, QUICK_CALLS if args.quick else 200)
  text = (f"Multiples of a plain memory pass (lower is better; medians of per-round ratios over "
          f"{1 if args.quick else args.rounds} rounds), measured on {machine()}. Where jaxnorm "
          f"chooses its frame at run time (batch, group and instance norm; layer norm below "
          f"4096 rows), XLA's planned bytes count both branches (the shifted pass runs only "
          f"for data far from 0), so they overstate what the benchmark's data moves. The "
          f"machine is shared: ratios move by 10 to 20% from run to run, more at 4096x4096.\n\n"
          + table(results))
  print(text)
  if args.baseline:
    print(f"\nAgainst the jaxnorm of {args.baseline}, in the same rounds:\n\n"
          + versus_table(results, "baseline"))
  if args.reference_paths:
    print("\nThe fast paths against the reference path (JAXNORM_KERNELS=reference), in the "
          "same rounds:\n\n" + versus_table(results, "reference", ("reference", "fast")))
  if args.readme:
    update_readme(text)
  return results


if __name__ == "__main__":
  main()
