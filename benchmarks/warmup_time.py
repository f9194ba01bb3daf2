"""Compile warm-up of the bundled pair (compile=True): a cold process and a second one.

Each warm-up runs in a fresh process, as a user's would: `SpeculativeGenerator.from_pretrained(
"bundled", compile=True).warmup()` (target, draft model, EAGLE-3 head and the sampled step's
graphs), in this order:

1. cold: nothing built. An empty compile cache (a temporary TORCHINDUCTOR_CACHE_DIR, which also
   holds the graphs specdec keeps, specdec.graph_store) and an empty temporary directory
   (TMPDIR): inductor keeps the precompiled C++ headers its builds share under
   `$TMPDIR/torchinductor_<user>`, whatever TORCHINDUCTOR_CACHE_DIR says, so a measurement that
   leaves TMPDIR alone reuses headers that earlier compiles on the machine built.
2. second process: the compile cache and the headers the first filled.
3. cold graphs, headers built: another empty compile cache, the headers of the first run (a
   first warm-up on a machine where something was compiled since the temporary directory was
   last cleared).

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


def run(cache: str, parallel: bool, tmp: str) -> dict:
    # TMPDIR: inductor keeps its precompiled headers under the temp dir, not the cache dir
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TMPDIR=tmp, PYTHONSAFEPATH="1")
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
    with tempfile.TemporaryDirectory() as tmp:
        cache, other = os.path.join(tmp, "cache"), os.path.join(tmp, "other-cache")
        headers = os.path.join(tmp, "tmp")
        os.makedirs(headers)
        cold = run(cache, parallel, headers)
        warm = run(cache, parallel, headers)
        headers_built = run(other, parallel, headers)
    report = {
        "command": "python -P benchmarks/warmup_time.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "parallel": parallel, "cold": cold, "second_process": warm, "cold_graphs_headers_built": headers_built,
        "second_over_cold": warm["warmup_s"] / cold["warmup_s"],
    }
    def graphs(run: dict) -> str:
        return (f"{run['graphs']} step graphs built, {run['loaded']} loaded; {run['sampling_graphs']} sampling graphs "
                f"built, {run['sampling_loaded']} loaded")

    text = (f"cold warm-up {cold['warmup_s']:.1f} s ({graphs(cold)}), second process {warm['warmup_s']:.1f} s "
            f"({graphs(warm)}) = {report['second_over_cold']:.0%} of it; cold graphs with inductor's headers built "
            f"{headers_built['warmup_s']:.1f} s{'' if parallel else ' (no helper process)'}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
