"""How long does ``import gradflow`` take, against ``import torch``? Fresh processes, one run.

Each statement runs in its own fresh interpreter, interleaved round by round so
that machine load hits all of them alike; the median of ``--repeats`` rounds is
reported with its difference and ratio to ``import torch``. Also listed: whether
pandas, scipy.stats and matplotlib were imported by ``import gradflow`` (they
should not be: they load where they are used).

    python benchmarks/import_bench.py                 # target: gradflow <= torch + 0.3 s
    python benchmarks/import_bench.py --repeats 9
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMER = ("import time, sys; t0 = time.perf_counter(); {stmt}; dt = time.perf_counter() - t0; "
         "import json; print(json.dumps(dict(s=dt, heavy=sorted(m for m in ('pandas', 'scipy.stats', "
         "'matplotlib', 'seaborn') if m in sys.modules))))")
STATEMENTS = {
    "torch": "import torch",
    "gradflow": "import gradflow",
    "gradflow + trace": "import gradflow; gradflow.trace",
    "gradflow + plot": "import gradflow; gradflow.plot",
}


def once(stmt: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", TIMER.format(stmt=stmt)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    times: dict[str, list[float]] = {k: [] for k in STATEMENTS}
    heavy: dict[str, list[str]] = {}
    for _ in range(a.repeats):
        for name, stmt in STATEMENTS.items():
            r = once(stmt)
            times[name].append(r["s"])
            heavy[name] = r["heavy"]
    torch_s = statistics.median(times["torch"])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {a.repeats} fresh processes each")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18s} {med:6.2f} s   {med - torch_s:+5.2f} s   x{med / torch_s:.2f} of torch   "
              f"heavy modules loaded: {', '.join(heavy[name]) or 'none'}")
    extra = statistics.median(times["gradflow"]) - torch_s
    print(f"import gradflow - import torch = {extra:+.2f} s (target <= +0.30 s): {'met' if extra <= 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
