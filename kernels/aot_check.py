"""Compile every kernel variant for a CUDA architecture, without a GPU.

    python -m specdec.kernels.aot_check [--arch 90] [--quick]

The CPU interpreter runs the kernels' arithmetic but not the compiler, so errors that
only the compiler sees (a global that is not a constexpr, a loop-carried value that
changes type, an unsupported op) would otherwise first show up on a GPU. This builds
each kernel as the launchers configure it (dtypes and constexpr flags), through
Triton's NVIDIA backend down to a cubin, and prints registers and local memory
(spills) per kernel. Exit status 1 if any variant fails to compile.

Must run with TRITON_INTERPRET unset or 0 (the kernels must be compiled functions).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _launch, greedy, probs, sampling

# Argument types by name, shared by all kernels (pointers name their element type).
_ARG_TYPES = {
    "draft_ptr": "*i64", "q_ptr": "*fp32", "u_ptr": "*fp32", "e_ptr": "*fp32", "num_draft_ptr": "*i64",
    "stats_ptr": "*fp32", "accept_ptr": "*i8", "best_ptr": "*i32", "tokens_ptr": "*i64",
    "accepted_ptr": "*i64", "out_ptr": "*fp32",
    "V": "i32", "K": "i32", "top_k": "i32", "temperature": "fp32", "top_p": "fp32",
}
_BLOCK = _launch.DEFAULT_BLOCK
_FILTERS = [(False, False), (True, False), (False, True), (True, True)]


def variants():
    """(label, kernel, logits element type, constexprs) for what the launchers launch."""
    out = []
    for dtype, has_nd in itertools.product(("bf16", "fp16", "fp32"), (True, False)):
        out.append((f"greedy row_argmax {dtype} num_draft={has_nd}", greedy._row_argmax_kernel, dtype,
                    dict(HAS_NUM_DRAFT=has_nd, BLOCK=_BLOCK)))
    for has_nd, block_k in itertools.product((True, False), (1, 8, 16)):
        out.append((f"greedy accept num_draft={has_nd} BLOCK_K={block_k}", greedy._greedy_accept_kernel, "bf16",
                    dict(HAS_NUM_DRAFT=has_nd, BLOCK_K=block_k)))
    filters = dict(SEARCH_BLOCK=_BLOCK // 4, NUM_CANDIDATES=_launch.NUM_CANDIDATES)
    for dtype, (top_k, top_p) in itertools.product(("bf16", "fp32"), _FILTERS):
        out.append((f"probs {dtype} top_k={top_k} top_p={top_p}", probs._logits_to_probs_kernel, dtype,
                    dict(SCALE_BY_RECIPROCAL=True, HAS_TOP_K=top_k, HAS_TOP_P=top_p, BLOCK=_BLOCK, **filters)))
    for has_q, (top_k, top_p) in itertools.product((True, False), _FILTERS):
        flags = dict(HAS_Q=has_q, HAS_NUM_DRAFT=True, SCALE_BY_RECIPROCAL=True, HAS_TOP_K=top_k,
                     HAS_TOP_P=top_p, NUM_STATS=sampling._NUM_STATS, BLOCK=_BLOCK)
        label = f"q={has_q} top_k={top_k} top_p={top_p}"
        out.append((f"sampling target_rows {label}", sampling._target_rows_kernel, "bf16", dict(flags, **filters)))
        out.append((f"sampling sample {label}", sampling._sample_kernel, "bf16", dict(flags, BLOCK_K=8)))
    return out


def _representative(label: str) -> bool:
    """The --quick subset: every kernel, with and without the top-k/top-p searches."""
    return label in {
        "greedy row_argmax bf16 num_draft=True", "greedy accept num_draft=True BLOCK_K=8",
        "probs bf16 top_k=False top_p=False", "probs bf16 top_k=True top_p=True",
        "sampling target_rows q=True top_k=False top_p=False", "sampling target_rows q=False top_k=True top_p=True",
        "sampling sample q=True top_k=False top_p=False", "sampling sample q=False top_k=True top_p=True",
    }


def _signature(kernel, logits_type: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "logits_ptr":
            sig[name] = "*" + logits_type
        elif name.startswith("stride_"):
            sig[name] = "i64"
        else:
            sig[name] = _ARG_TYPES[name]
    return sig


def _resources(cubin: bytes) -> str:
    """Registers and local memory from cuobjdump, when the backend ships it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = [line.strip() for line in text.splitlines() if "REG:" in line]
    return " ".join(part for part in (usage[0].split() if usage else []) if part.split(":")[0] in ("REG", "LOCAL"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true",
                        help="one variant per code path (plain and filtered) instead of every dtype/flag combination")
    args = parser.parse_args(argv)
    if _launch.is_interpreted(greedy._row_argmax_kernel):
        print("TRITON_INTERPRET is set: run with TRITON_INTERPRET=0 to compile the kernels", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, logits_type, constexprs in variants():
        if args.quick and not _representative(label):
            continue
        try:
            source = ASTSource(fn=kernel, signature=_signature(kernel, logits_type, constexprs), constexprs=constexprs)
            compiled = triton.compile(source, target=target, options={"num_warps": 8, **_launch.EXACT_ROUNDING})
            print(f"ok    sm_{args.arch} {label}: {_resources(compiled.asm['cubin'])}")
        except Exception as error:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL  sm_{args.arch} {label}: {type(error).__name__}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
