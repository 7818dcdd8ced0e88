"""jaxqp training under SPMD layouts on 8 simulated CPU devices: step time, extra collectives, state bytes.

Runs ``tests/sharded_layouts.py --time ROUNDS`` in a subprocess (the 8 host devices must be
requested before JAX starts): a 64-256-32 MLP trained with each layout (dp, tp, fsdp, 2d)
and config (w8a8, pruned80+int8, nm2:4, global90, float), sharded and unsharded. Rows:
``{layout, config, step_ratio_vs_float_same_layout, collectives_extra,
state_bytes_per_device_ratio, max_abs_diff, masks_equal}``. The 8 devices share this
machine's cores, so step times measure the overhead of jaxqp's extra work under SPMD, not
a speed-up.

The default model is the test's MLP scaled by 8 (512-2048-256, batch 512); ``--scale 1`` times
the test's own 64-256-32 MLP, whose steps last a few milliseconds, so fixed per-op costs dominate.

    python benchmarks/sharding.py --json sharding.json
    python benchmarks/sharding.py --rounds 5         # fewer timed steps
    python benchmarks/sharding.py --scale 1          # the test's 64-256-32 MLP, batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import json_file, write_json

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "sharded_layouts.py")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="timed steps per layout and config")
    parser.add_argument("--scale", type=int, default=8,
                        help="multiply the test MLP's widths and batch (8: 512-2048-256, batch 512)")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    proc = subprocess.run([sys.executable, SCRIPT, "--time", str(args.rounds), "--scale", str(args.scale)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if "check" not in r]  # the test's own checks
    print(f"{'layout':<6} {'config':<14} {'step vs float':>13} {'extra collectives':>18} {'state/params':>13} "
          f"{'max |diff|':>11} {'masks':>6}")
    for r in rows:
        print(f"{r['layout']:<6} {r['config']:<14} {r['step_ratio_vs_float_same_layout']:12.3f}x "
              f"{len(r['collectives_extra']):18d} {r['state_bytes_per_device_ratio']:13.4f} "
              f"{r['max_abs_diff']:11.1e} {'equal' if r['masks_equal'] else 'DIFFER':>6}")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
