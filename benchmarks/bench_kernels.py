"""Verification and sampling kernels: plain-PyTorch reference vs fused Triton.

For every op and shape it times both implementations side by side in one run (median
of repeats), checks that they emit the same tokens, and reports microseconds and
effective GB/s. On a GPU it also measures the device's copy bandwidth (a large
device-to-device copy, read + write bytes) and reports each kernel's share of it.
Writes a CSV and a markdown table, with the device and the command, to
<--out>/kernels_<device>.{csv,md} (default benchmarks/results).

    python benchmarks/bench_kernels.py              # GPU: bf16 + fp32, B {1,64}, K 4, V {32000,128256,151936}
    python benchmarks/bench_kernels.py --quick      # a tiny grid; runs on CPU under TRITON_INTERPRET=1

Effective bytes are what the fused op has to move at least, the same for both
implementations: every target logit (all K+1 positions can be needed), the draft
tokens, and the outputs; for sampling also one row of exponential noise per batch row
and, with draft probabilities, one row of q per batch row (the residual's) plus the K
gathered q values; for logits -> probs the logits read and the float32 probs written.

Without CUDA the Triton kernels run in the interpreter on CPU: its timings only show
that the script and kernels run, not how fast the kernels are.

The reference is the eager PyTorch path the engine takes off the GPU (it includes the
non-finite-logit handling, one elementwise pass, like the kernels). With top-p, which
token sits exactly on the boundary can differ between the sort + cumsum of the
reference and the kernel's tile sums (float32 rounding of the cumulative mass), so
"same output" may read "NO" for a `_topk_topp` row without either being wrong.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import subprocess
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import triton  # noqa: E402

from specdec.kernels import reference  # noqa: E402
from specdec.kernels.greedy import verify_greedy_triton  # noqa: E402
from specdec.kernels.probs import logits_to_probs_triton  # noqa: E402
from specdec.kernels.sampling import verify_sampling_triton  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("verify_greedy", "verify_sampling", "verify_sampling_topk_topp", "logits_to_probs", "logits_to_probs_topk_topp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Targets from the kernel issue, checked on GPU runs only.
TARGET_SPEEDUP = 3.0
TARGET_COPY_FRACTION = 0.5


@dataclass
class Row:
    op: str
    batch: int
    k: int | str
    vocab: int
    dtype: str
    reference_us: float
    triton_us: float
    speedup: float
    reference_gbps: float
    triton_gbps: float
    triton_pct_of_copy: float | None
    same_output: bool


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (interpreter ratios are tiny)."""
    return float(f"{x:.{digits}g}")


def _median_us(fn, reps: int, cuda: bool) -> float:
    """Median wall time of fn() in microseconds."""
    if cuda:
        # Flushes L2 between runs and times with CUDA events.
        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up (the interpreter rewrites each kernel once)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = _median_us(lambda: dst.copy_(src), reps=5, cuda=True)
    return 2 * n * 2 / (us * 1e-6) / 1e9


def _inputs(op: str, batch: int, k: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Arguments for the reference and the kernel, and the op's effective bytes."""
    g = torch.Generator(device=device).manual_seed(seed)
    elt = torch.tensor([], dtype=dtype).element_size()
    if op.startswith("logits_to_probs"):
        logits = (torch.randn(batch, vocab, device=device, generator=g) * 3).to(dtype)  # [B, V]: a draft step
        top_k, top_p = (50, 0.9) if op.endswith("topk_topp") else (0, 1.0)
        return (logits,), dict(temperature=0.8, top_k=top_k, top_p=top_p), batch * vocab * (elt + 4)
    target = (torch.randn(batch, k + 1, vocab, device=device, generator=g) * 3).to(dtype)  # [B, K+1, V]
    num_draft = torch.full((batch,), k, dtype=torch.int64, device=device)
    logit_bytes = batch * (k + 1) * vocab * elt
    io_bytes = batch * k * 8 + batch * (k + 1) * 8 + batch * 8 * 2  # drafts, tokens, counts, num_draft
    if op == "verify_greedy":
        best = target[:, :k].argmax(-1)
        # Drafts right about 70% of the time, like a decent draft model.
        wrong = torch.rand(best.shape, device=device, generator=g) > 0.7
        drafts = torch.where(wrong, (best + 1) % vocab, best)
        return (drafts, target, num_draft), {}, logit_bytes + io_bytes
    top_k, top_p = (50, 0.9) if op == "verify_sampling_topk_topp" else (0, 1.0)
    draft_logits = target[:, :k].float() + 0.5 * torch.randn(batch, k, vocab, device=device, generator=g)
    draft_probs = reference.logits_to_probs(draft_logits, 0.8, top_k, top_p)  # [B, K, V]
    noise = torch.empty(draft_probs.shape, device=device).exponential_(generator=g)
    drafts = reference.sample_exponential_race(draft_probs, noise)
    uniforms = torch.rand(batch, k, device=device, generator=g)
    exponentials = torch.empty(batch, vocab, device=device).exponential_(generator=g)
    kwargs = dict(temperature=0.8, top_k=top_k, top_p=top_p, num_draft=num_draft)
    sample_bytes = batch * vocab * 4 * 2 + batch * k * (4 + 4)  # noise row, q row, uniforms, q gathers
    return (drafts, draft_probs, target, uniforms, exponentials), kwargs, logit_bytes + io_bytes + sample_bytes


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return bool(((a > 0) == (b > 0)).all()) and torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def bench_one(op, batch, k, vocab, dtype_name, device, reps, copy_gbps) -> Row:
    cuda = device.type == "cuda"
    args, kwargs, nbytes = _inputs(op, batch, k, vocab, DTYPES[dtype_name], device, seed=batch * 1000 + k + vocab)
    ref_fn, tri_fn = {
        "verify_greedy": (reference.verify_greedy, verify_greedy_triton),
        "verify_sampling": (reference.verify_sampling, verify_sampling_triton),
        "verify_sampling_topk_topp": (reference.verify_sampling, verify_sampling_triton),
        "logits_to_probs": (reference.logits_to_probs, logits_to_probs_triton),
        "logits_to_probs_topk_topp": (reference.logits_to_probs, logits_to_probs_triton),
    }[op]
    same = _same(ref_fn(*args, **kwargs), tri_fn(*args, **kwargs))
    ref_us = _median_us(lambda: ref_fn(*args, **kwargs), reps, cuda)
    tri_us = _median_us(lambda: tri_fn(*args, **kwargs), reps, cuda)
    tri_gbps = nbytes / (tri_us * 1e-6) / 1e9
    return Row(
        op=op, batch=batch, k=k if not op.startswith("logits_to_probs") else "-", vocab=vocab, dtype=dtype_name,
        reference_us=_sig(ref_us), triton_us=_sig(tri_us), speedup=_sig(ref_us / tri_us, 3),
        reference_gbps=_sig(nbytes / (ref_us * 1e-6) / 1e9, 3), triton_gbps=_sig(tri_gbps, 3),
        triton_pct_of_copy=round(100 * tri_gbps / copy_gbps, 1) if copy_gbps else None,
        same_output=same,
    )


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, Triton interpreter)"


def _write(rows: list[Row], device: torch.device, copy_gbps: float | None, command: str,
           out: Path) -> tuple[Path, Path]:
    tag = "cpu_interpreter" if device.type != "cuda" else "cuda_" + "".join(
        c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device).lower()).strip("_")
    dtypes = sorted({r.dtype for r in rows})
    tag += "_" + "_".join(dtypes)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"kernels_{tag}.csv", out / f"kernels_{tag}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

    lines = [
        f"# Kernel benchmark: reference vs Triton on {_device_name(device)}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; commit {_commit()}; torch {torch.__version__}, "
        f"triton {triton.__version__}, python {platform.python_version()}",
        "- timings: median per call, both implementations timed side by side in this run"
        + ("; CUDA events with the L2 cache flushed before each call" if device.type == "cuda" else ""),
        "- GB/s: effective bytes (see benchmarks/bench_kernels.py) / median time",
        "- sampling ops: temperature 0.8, K drafts per row sampled from a correlated draft's "
        "probabilities; `_topk_topp` adds top-k 50 and top-p 0.9 (threshold searches, up to 18 passes per row); "
        "greedy drafts match the argmax 70% of the time",
    ]
    if copy_gbps:
        lines.append(f"- device copy bandwidth (1 GiB device-to-device copy, read + write): {copy_gbps:.0f} GB/s")
    else:
        lines += ["", "**Interpreter run: the Triton column is the CPU interpreter, not a GPU. These numbers "
                      "show that the benchmark and the kernels run and agree with the reference; they say "
                      "nothing about kernel speed.**"]
    header = ["op", "B", "K", "V", "dtype", "reference us", "triton us", "speedup",
              "reference GB/s", "triton GB/s"] + (["% of copy"] if copy_gbps else []) + ["same output"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.op, r.batch, r.k, r.vocab, r.dtype, r.reference_us, r.triton_us, f"{r.speedup}x",
                 r.reference_gbps, r.triton_gbps] + ([r.triton_pct_of_copy] if copy_gbps else []) + [
                 "yes" if r.same_output else "NO"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Summary", ""] + summary(rows, copy_gbps)
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def summary(rows: list[Row], copy_gbps: float | None) -> list[str]:
    out = []
    for op, dtype in itertools.product(OPS, DTYPES):
        mine = [r for r in rows if r.op == op and r.dtype == dtype]
        if not mine:
            continue
        slowest = min(mine, key=lambda r: r.speedup)
        largest = max(mine, key=lambda r: r.batch * ((r.k if isinstance(r.k, int) else 0) + 1) * r.vocab)
        line = (f"- {op} {dtype}: speedup min {slowest.speedup}x (B={slowest.batch}, K={slowest.k}, V={slowest.vocab}), "
                f"median {statistics.median(r.speedup for r in mine):.3g}x")
        if copy_gbps:
            line += (f"; largest shape (B={largest.batch}, K={largest.k}, V={largest.vocab}) at "
                     f"{largest.triton_pct_of_copy}% of copy bandwidth")
            line += (f" [targets: >= {TARGET_SPEEDUP:g}x everywhere: "
                     f"{'met' if slowest.speedup >= TARGET_SPEEDUP else 'NOT met'}; >= "
                     f"{100 * TARGET_COPY_FRACTION:.0f}% of copy at the largest size: "
                     f"{'met' if largest.triton_pct_of_copy >= 100 * TARGET_COPY_FRACTION else 'NOT met'}]")
        out.append(line)
    if not all(r.same_output for r in rows):
        out.append("- WARNING: some outputs differ between reference and Triton (see 'same output')")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid (B {1,3}, K 2, V 1000) for the interpreter")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 64)")
    parser.add_argument("--k", type=int, nargs="+", help="draft lengths (default 4)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32000 128256 151936)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+",
                        help="logit dtypes (default bf16 fp32 on GPU, fp32 on CPU)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--reps", type=int, default=None, help="repeats on CPU (GPU uses do_bench)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the csv and markdown")
    args = parser.parse_args(argv)
    for name in ("batch", "k", "vocab"):
        values = getattr(args, name) or []
        if any(v < (0 if name == "k" else 1) for v in values):
            parser.error(f"--{name} values must be >= {0 if name == 'k' else 1}, got {values}")
    command = "python benchmarks/bench_kernels.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = args.batch or ([1, 3] if args.quick else [1, 64])
    ks = args.k or ([2] if args.quick else [4])
    vocabs = args.vocab or ([1000] if args.quick else [32000, 128256, 151936])
    dtypes = args.dtype or (["bf16", "fp32"] if cuda else ["fp32"])
    reps = args.reps or (2 if args.quick else 10)
    if not cuda and not args.quick and not (args.batch and args.k and args.vocab):
        parser.error("no CUDA device: the interpreter cannot run the full-size grid; use --quick")

    copy_gbps = copy_bandwidth_gbps(device) if cuda else None
    print(f"device: {_device_name(device)}" + (f", copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    rows = []
    for op, dtype in itertools.product(args.ops, dtypes):
        for vocab in vocabs:
            for batch in batches:
                for k in (ks if not op.startswith("logits_to_probs") else [0]):
                    row = bench_one(op, batch, k, vocab, dtype, device, reps, copy_gbps)
                    rows.append(row)
                    print(f"{op:26s} B={batch:<3d} K={row.k!s:<2s} V={vocab:<6d} ref {row.reference_us:>10.1f} us  "
                          f"triton {row.triton_us:>10.1f} us  {row.speedup:>8.3g}x  {row.triton_gbps:>8.3g} GB/s"
                          + (f"  {row.triton_pct_of_copy:>5.1f}% copy" if copy_gbps else "")
                          + ("" if row.same_output else "  OUTPUT DIFFERS"), flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
    csv_path, md_path = _write(rows, device, copy_gbps, command, args.out)
    print("\n".join(summary(rows, copy_gbps)))
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
