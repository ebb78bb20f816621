"""Step cost of two versions of the library side by side, in one run: ``step_cost.py``'s steps, interleaved.

A shared machine's load moves from minute to minute, so two separate runs of ``step_cost.py`` do not compare. Here
one worker process per version (``PYTHONPATH`` = that version's ``src``) builds the same quick (CPU) setup; the
driver asks them in turn for one OrthoGrad step and one NegGrad+ step, in an order that rotates every repeat, and
reports medians of the wall time and of the worker thread's CPU time (which other jobs' load inflates less), then
the peak memory (``step_cost.py``'s measurement, median of 3). Ratios are OrthoGrad / NegGrad+ of the same worker.
``--base-engine`` gives the base worker another engine (e.g. one version's two engines side by side); the first two
OrthoGrad steps of each worker (warm-up: engine choice, the fused pass's first step) are reported apart, in seconds.

    git archive BASE src | tar -x -C /tmp/base
    python benchmarks/step_cost_ab.py --base /tmp/base/src --new src --engine ghost --repeats 15
    python benchmarks/step_cost_ab.py --base src --new src --base-engine ghost_two_pass --engine ghost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker() -> None:
    """Serve requests on stdin, one JSON line each: build a setup, time a step, or measure a step's peak memory."""
    import step_cost as sc  # a script's own folder is on sys.path
    import torch
    device, steps = torch.device("cpu"), None
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "build":
            setup = next(s for s in sc.quick_setups() if s.name == request["setup"])
            steps = sc._Steps(setup, request["engine"], device=device, bf16=False, chunk_size=None)
            warm_up = 0.0
            for _ in range(2):  # warm-up (engine choice; "auto" fusion measures on its first step)
                start = time.perf_counter()
                steps.orthograd_step()
                warm_up += time.perf_counter() - start
                steps.neggrad_plus_step()
            reply: object = [steps.orthograd.engine, warm_up]
        else:
            fn = steps.orthograd_step if request["which"] == "orthograd" else steps.neggrad_plus_step
            if request["do"] == "time":
                wall, cpu = time.perf_counter(), time.thread_time()
                fn()
                reply = [time.perf_counter() - wall, time.thread_time() - cpu]
            else:
                reply = sc._peak_bytes(fn, device)
        print(json.dumps(reply), flush=True)


class _Worker:
    def __init__(self, src: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **request: object) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {request} died (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def compare(
    setup: str, engines: dict[str, str], workers: dict[str, _Worker], repeats: int
) -> dict[str, dict[str, float]]:
    """Per version: median OrthoGrad and NegGrad+ wall and CPU ms, their ratios, the memory ratio, and the wall
    seconds of the two warm-up OrthoGrad steps."""
    built = {name: w.ask(do="build", setup=setup, engine=engines[name]) for name, w in workers.items()}
    jobs = [(name, which) for name in workers for which in ("orthograd", "neggrad")]
    times: dict[tuple[str, str], list[list[float]]] = {job: [] for job in jobs}
    for r in range(repeats):
        for name, which in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
            times[(name, which)].append(workers[name].ask(do="time", which=which))
    out = {}
    for name, w in workers.items():
        med = {which: [1e3 * statistics.median(t[i] for t in times[(name, which)]) for i in (0, 1)]
               for which in ("orthograd", "neggrad")}
        mem = {which: statistics.median(w.ask(do="memory", which=which) for _ in range(3))
               for which in ("orthograd", "neggrad")}
        out[name] = {
            "engine": f"{engines[name]}: {built[name][0]}", "warm_up_s": built[name][1],
            "ortho_wall": med["orthograd"][0], "neg_wall": med["neggrad"][0],
            "ortho_cpu": med["orthograd"][1], "neg_cpu": med["neggrad"][1],
            "wall_ratio": med["orthograd"][0] / med["neggrad"][0], "cpu_ratio": med["orthograd"][1] / med["neggrad"][1],
            "ortho_mib": mem["orthograd"] / 2**20, "neg_mib": mem["neggrad"] / 2**20,
            "memory_ratio": mem["orthograd"] / max(mem["neggrad"], 1),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help="the base version's src folder")
    parser.add_argument("--new", help="the new version's src folder")
    quick = ["smallcnn_8_full", "smallcnn_8_lora", "resnet18_32_full", "resnet18_32_lora"]
    parser.add_argument("--setups", nargs="*", default=quick, help="step_cost.py quick setups")
    parser.add_argument("--engine", default="ghost", help="a step_cost.py engine (default: ghost, engine='auto')")
    parser.add_argument("--base-engine", help="the base worker's engine (default: --engine)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return
    if not args.base or not args.new:
        parser.error("pass --base and --new (each a folder holding the orthograd package)")
    engines = {"base": args.base_engine or args.engine, "new": args.engine}
    print(f"load before: {os.getloadavg()}; repeats {args.repeats}; engines {engines}", flush=True)
    workers = {"base": _Worker(args.base), "new": _Worker(args.new)}
    print("| setup | version (engine: used) | warm-up s | OrthoGrad ms (wall / CPU) | NegGrad+ ms (wall / CPU) "
          "| time ratio wall | time ratio CPU | OrthoGrad MiB | NegGrad+ MiB | memory ratio |\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for setup in args.setups:
            for name, r in compare(setup, engines, workers, args.repeats).items():
                print(f"| {setup} | {name} ({r['engine']}) | {r['warm_up_s']:.1f} "
                      f"| {r['ortho_wall']:.1f} / {r['ortho_cpu']:.1f} "
                      f"| {r['neg_wall']:.1f} / {r['neg_cpu']:.1f} | {r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x "
                      f"| {r['ortho_mib']:.0f} | {r['neg_mib']:.0f} | {r['memory_ratio']:.2f}x |", flush=True)
    finally:
        for w in workers.values():
            w.close()
    print(f"load after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
