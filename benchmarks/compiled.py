"""Whether two checkouts of jaxnorm compile to the same programs, on the speed benchmark's cases.

For each op, shape and pass of ``benchmarks/speed.py``, XLA compiles jaxnorm's function (the
same jitted function the speed benchmark times) here and in the checkout ``--baseline DIR``;
the table gives each program's fingerprint (the optimized HLO with source locations and
instruction numbers left out) and whether the two are equal. Equal programs run at the same
speed: a refactor that leaves every fingerprint equal cannot have changed the speed, whatever
the timings of a shared machine say.

Run: python benchmarks/compiled.py --baseline DIR [--quick] [--only layer_norm,...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (the cases and the functions they time)


def fingerprint(compiled_text: str) -> str:
  """The optimized HLO without source metadata and instruction numbers, hashed."""
  text = re.sub(r"metadata=\{[^}]*\}", "", compiled_text)
  lines = [re.sub(r"stack_frame_id=[0-9]+", "", line) for line in text.splitlines()
           if re.match(r"\s*(%|ROOT|ENTRY|fused|\})", line) and "parent_frame_id" not in line]
  return hashlib.sha1(re.sub(r"\.[0-9]+\b", "", "\n".join(lines)).encode()).hexdigest()[:12]


def fingerprints(cases) -> dict[str, str]:
  """{'op shape pass': fingerprint} of jaxnorm's compiled function, in this process."""
  result = {}
  for op, shape in cases:
    for mode in speed.MODES:
      if op.startswith("standardize") and mode != "fwd":
        continue
      functions = speed.jax_functions(op, shape, mode, peers=("jaxnorm",))
      if "jaxnorm" not in functions:
        continue
      fn, args = functions["jaxnorm"]
      key = f"{op} {'x'.join(map(str, shape))} {mode}"
      result[key] = fingerprint(fn.lower(*args).compile().as_text())
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--baseline", metavar="DIR", help="the other checkout")
  parser.add_argument("--quick", action="store_true", help="the speed benchmark's small shapes")
  parser.add_argument("--only", default="", help="comma-separated ops")
  parser.add_argument("--print-json", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cases = speed.QUICK_CASES if args.quick else speed.CASES
  if args.only:
    cases = [c for c in cases if c[0] in args.only.split(",")]
  ours = fingerprints(cases)
  if args.print_json:
    print(json.dumps(ours))
    return ours
  theirs = {}
  if args.baseline:
    command = [sys.executable, os.path.abspath(__file__), "--print-json"]
    command += ["--quick"] if args.quick else []
    command += ["--only", args.only] if args.only else []
    reply = subprocess.run(command, capture_output=True, text=True, check=True,
                           cwd=os.path.abspath(args.baseline),
                           env=dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline)))
    theirs = json.loads(reply.stdout.strip().splitlines()[-1])
  lines = ["| op shape pass | baseline | this checkout | same program |", "|---|---|---|---|"]
  for key, value in ours.items():
    other = theirs.get(key, "-")
    lines.append(f"| {key} | {other} | {value} | {'yes' if other == value else 'no'} |")
  print("\n".join(lines))
  same = sum(theirs.get(key) == value for key, value in ours.items())
  print(f"\n{same} of {len(ours)} programs are the same as the baseline's.")
  return ours


if __name__ == "__main__":
  main()
