"""Nanoseconds per random number: torch's CPU generator (`torch.randn`, the `"cpu"` generator) against the counter
generator of `hf_hiso.zo_random` (Gaussian and Rademacher), at 1 and 2 threads, on one tensor of MiniLM's word
embedding size (11.7 M entries).

The draws are interleaved (each repetition draws with every generator at every thread count, the order rotated) and
the figures are medians, so a shared machine's slow phases hit all of them alike. Run
`python benchmarks/generator_speed.py [--reps 7] [--output-json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_hiso.zo_random import fill_

NUMEL = 30522 * 384  # MiniLM's word embeddings, its largest tensor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    out = torch.empty(NUMEL)
    gen = torch.Generator().manual_seed(0)
    draws = {
        "torch.randn (cpu generator)": lambda: out.normal_(generator=gen),
        "counter, gaussian": lambda: fill_(out, 12345, 0, "gaussian"),
        "counter, rademacher": lambda: fill_(out, 12345, 0, "rademacher"),
    }
    cases = [(name, threads) for threads in args.threads for name in draws]
    times: dict[str, list[float]] = {f"{n} @ {t} thread(s)": [] for n, t in cases}
    saved = torch.get_num_threads()
    try:
        for rep in range(args.reps + 1):  # repetition 0 is the warm-up
            shift = rep % len(cases)
            for name, threads in cases[shift:] + cases[:shift]:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                draws[name]()
                if rep:
                    times[f"{name} @ {threads} thread(s)"].append((time.perf_counter() - start) / NUMEL * 1e9)
    finally:
        torch.set_num_threads(saved)
    result = {k: {"median_ns": statistics.median(v), "min_ns": min(v), "max_ns": max(v)} for k, v in times.items()}
    for key, r in result.items():
        print(f"{key:45s} {r['median_ns']:6.2f} ns a number  [{r['min_ns']:.2f}, {r['max_ns']:.2f}]")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"numel": NUMEL, "reps": args.reps, "ns": result}, indent=2))
    return result


if __name__ == "__main__":
    main()
