"""The warm-up helper process (specdec.compiled.WarmHelper): loads a generator's models as
`SpeculativeGenerator.from_pretrained` did, builds the parts of its graphs it is given and
keeps them (specdec.graph_store), then exits.

    python -m specdec.warm_worker '{"target": ..., "draft": ..., "head": ..., "dtype": ..., "batches": ...}' \
        head,sampling
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # the other core is the parent's
    from .generator import SpeculativeGenerator

    spec = json.loads(argv[0])
    gen = SpeculativeGenerator.from_pretrained(spec["target"], spec["draft"], head=spec["head"], dtype=spec["dtype"],
                                               compile=True)
    gen._compiler.warm = True
    for part in argv[1].split(","):  # the parent builds the others meanwhile
        start = time.perf_counter()
        gen._warm(part, bool(spec["batches"]))
        print(f"built {part} in {time.perf_counter() - start:.1f} s", flush=True)  # the parent logs these lines
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
