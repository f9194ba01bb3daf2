"""The warm-up helper process (specdec.compiled.WarmHelper): loads a generator's models as
`SpeculativeGenerator.from_pretrained` did and builds its draft model's, head's and sampled
step's graphs (all but the target's) into torch's compile caches, then exits.

    python -m specdec.warm_worker '{"target": ..., "draft": ..., "head": ..., "dtype": ..., "batches": ...}'
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # the other core is the parent's
    from .generator import SpeculativeGenerator

    spec = json.loads(argv[0])
    gen = SpeculativeGenerator.from_pretrained(spec["target"], spec["draft"], head=spec["head"], dtype=spec["dtype"],
                                               compile=True)
    gen._compiler.warm = True
    for part in ("draft", "head", "sampling"):  # the target's graphs are built by the parent
        gen._warm(part, bool(spec["batches"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
