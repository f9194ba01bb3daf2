"""Compile warm-up of the bundled pair (compile=True): a cold process and a second one.

Each warm-up runs in a fresh process, as a user's would: `SpeculativeGenerator.from_pretrained(
"bundled", compile=True).warmup()` (target, draft model, EAGLE-3 head and the sampled step's
graphs). The first uses an empty compile cache (a temporary TORCHINDUCTOR_CACHE_DIR, which also
holds the graphs specdec keeps, specdec.graph_store), the second the cache the first filled.
`--no-parallel` warms up without the helper process.

    python -P benchmarks/warmup_time.py --out benchmarks/results/warmup_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from specdec import SpeculativeGenerator
start = time.perf_counter()
gen = SpeculativeGenerator.from_pretrained("bundled", compile=True)
loaded = time.perf_counter() - start
seconds = gen.warmup(parallel=sys.argv[1] == "1")
stats = gen.compile_stats()
print(json.dumps({"warmup_s": seconds, "load_s": loaded, "graphs": stats["graphs"], "loaded": stats["loaded"],
                  "sampling_graphs": stats["sampling"]["graphs"], "sampling_loaded": stats["sampling"]["loaded"],
                  "recompiles": stats["recompiles"]}))
"""


def run(cache: str, parallel: bool) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if parallel else "0"], env=env, capture_output=True,
                         text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-parallel", action="store_true", help="warm up without the helper process")
    args = parser.parse_args()
    import torch
    import transformers

    parallel = not args.no_parallel
    with tempfile.TemporaryDirectory() as cache:
        cold = run(cache, parallel)
        warm = run(cache, parallel)
    report = {
        "command": "python -P benchmarks/warmup_time.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "parallel": parallel, "cold": cold, "second_process": warm,
        "second_over_cold": warm["warmup_s"] / cold["warmup_s"],
    }
    def graphs(run: dict) -> str:
        return (f"{run['graphs']} step graphs built, {run['loaded']} loaded; {run['sampling_graphs']} sampling graphs "
                f"built, {run['sampling_loaded']} loaded")

    text = (f"cold warm-up {cold['warmup_s']:.1f} s ({graphs(cold)}), second process {warm['warmup_s']:.1f} s "
            f"({graphs(warm)}) = {report['second_over_cold']:.0%} of it{'' if parallel else ' (no helper process)'}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
