"""The `specdec` command: generate, bench, serve, cache.

    specdec bench                        # bundled pair: the headline comparison, a few minutes
    specdec bench --full                 # adds the K sweep and the cache workload
    specdec bench --quick                # a smoke run in under a minute
    specdec bench --preset smollm2       # SmolLM2-135M on HumanEval, under 10 minutes on a CPU
    specdec bench --workload grounded    # a named prompt set (stdlib, humaneval, grounded, chat)
    specdec generate "def fib(n):" --stream --stop "\n\n"
    specdec serve --port 8000            # an OpenAI-compatible HTTP server (the serve extra)
    specdec cache ...                    # cache administration (specdec.cache.cli)

Bad arguments exit with status 2 and a message saying what was wrong and how to fix it,
before any model loads. Ctrl-C exits with status 130 without a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _k_list(text: str) -> list[int]:
    from .bench.config import parse_int_list

    try:
        return parse_int_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def _k_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0 or "auto", got {text!r}') from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def _drafter_names() -> list[str]:
    """Every name --drafter accepts (specdec.drafters.available_drafters: the registered drafters,
    plug-ins included, "auto" and "none"); ValueError saying where plug-ins come from when one
    fails to import."""
    from .drafters import ENTRY_POINT_GROUP, PLUGIN_ENV, available_drafters

    try:
        return available_drafters()
    except Exception as exc:  # a plug-in's import raised: whatever its code raises
        named = os.environ.get(PLUGIN_ENV)
        where = f"{PLUGIN_ENV}={named!r} or " if named else ""
        raise ValueError(f"a drafter plug-in did not load ({where}the {ENTRY_POINT_GROUP!r} entry points): "
                         f"{type(exc).__name__}: {exc}") from exc


def _registry_help() -> tuple[str, str]:
    """The help of --drafter (generate) and --methods (bench), from the drafter registry."""
    from .bench.config import PRESETS, all_methods
    from .drafters import AUTO, NONE

    try:
        names = _drafter_names()
    except ValueError as exc:  # the command itself reports it (exit 2); help still prints
        return f"default: auto (the list of drafters is unavailable: {exc})", f"(unavailable: {exc})"
    drafters = [n for n in names if n not in (AUTO, NONE)]
    drafter = f"{', '.join(drafters)}, {NONE} (plain decoding) or {AUTO} (default: the drafter chosen per step)"
    methods = (f"subset of {','.join(all_methods())}; X-auto is drafter X with K chosen per step; X-eager "
               "(--compile only) is specdec's X on an eager generator beside the compiled rows (default: "
               f"the preset's: {','.join(PRESETS['headline'].methods)}; --full and --quick: all but hf-compiled, "
               "which --compile adds)")
    return drafter.replace("%", "%%"), methods.replace("%", "%%")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", help="target model: hub id, local path or a named real model such as smollm2-135m "
                                    "(default: the bundled pair's target; bench: the preset's, if it names one)")
    g.add_argument("--draft", help="draft model: hub id or local path; 'none' for no draft; 'random' (bench) a "
                                   "random-weight draft of the target's shape, the useless-draft workload "
                                   "(default: the bundled draft when neither --target nor a real-model preset is given)")
    g.add_argument("--head", help="EAGLE-3 head (drafter eagle): a local folder in the published EAGLE-3 layout; "
                                  "'none' for no head (default: the head shipped for the target, if any: the "
                                  "bundled pair's, SmolLM2-135M's)")
    g.add_argument("--device", help="torch device for both models (cpu, cuda, cuda:1, mps)")
    g.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the checkpoint's config)")
    g.add_argument("--device-map", choices=("auto",), help="let accelerate place the target (multi-GPU / offload)")
    g.add_argument("--numerics", choices=("native", "stable"), default="native",
                   help="native: compute as loaded; stable: the target's final norm and LM head in float32 and "
                        "eager attention, so that in bfloat16 neither the drafter nor a cache hit's check breaks "
                        "a near-tie differently (default: native)")
    g.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (bench default: 1 per process on CPU, so that a shared machine "
                        "neither stalls nor skews timings; otherwise torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="specdec",
        description="Speculative decoding for Hugging Face causal LMs: generate, benchmark, manage the cache.",
    )
    from . import __version__
    from .bench.config import PRESETS
    from .workload import DEFAULT_WORKLOAD, WORKLOADS

    drafter_help, methods_help = _registry_help()
    parser.add_argument("--version", action="version", version=f"specdec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,bench,serve,cache}")
    sub.required = True

    gen = sub.add_parser("generate", help="generate for one prompt, then print a stats line",
                         description="Generate a continuation of one prompt; text on stdout, stats on stderr.")
    gen.add_argument("prompt", help="prompt text; '-' reads it from stdin")
    _add_model_options(gen)
    g = gen.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=_non_negative_int)
    g.add_argument("--drafter", default="auto", help=drafter_help)
    g.add_argument("--num-draft-tokens", type=_non_negative_int, default=4, help="K drafts per step")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (cut before it); repeat for several")
    g.add_argument("--cache", help="cache URL (redis://..., memory://); default: none")
    g.add_argument("--stream", action="store_true", help="print text as the target accepts it, then the stats")
    g.add_argument("--compile", action="store_true",
                   help="compile the decoding step (torch.compile) before generating; the warm-up is printed "
                        "on stderr (tens of seconds on a CPU the first time, a few with torch's compile cache warm)")

    bench = sub.add_parser(
        "bench",
        help="speculative decoding vs baseline and Hugging Face generate, side by side",
        description="Benchmark baseline, draft-model and n-gram drafting against transformers' "
                    "generate (plain, assisted, prompt lookup) on the same models and prompts. The default is "
                    "the headline at one K (a few minutes on a 2-core CPU); --full adds the K sweep and the "
                    "cache workload; --preset smollm2 / gemma3 run a real pretrained model on a real workload "
                    "(HumanEval, grounded tasks).",
    )
    _add_model_options(bench)
    b = bench.add_argument_group("benchmark")
    b.add_argument("--num-draft-tokens", "--k", type=_k_list, default=None, metavar="K[,K...]",
                   help="K, or a sweep like 4,2,8 (the first value is the main K used for the sampled "
                        "setting and the cache rows; default: " + _preset_values("num_draft_tokens") + ")")
    b.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: " + _preset_values("max_new_tokens"))
    b.add_argument("--num-prompts", type=_positive_int, default=None,
                   help="the first N prompts of the workload; default: " + _preset_values("num_prompts"))
    b.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repeats; default: " + _preset_values("repeats"))
    b.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up pass (compile warm-ups still run)")
    b.add_argument("--compile", action="store_true",
                   help="specdec's methods on a compiled generator (compile=True), warmed up before the timed "
                        "runs, and hf-compiled joins the preset's methods; warm-up seconds are reported apart")
    preset = b.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=tuple(PRESETS), default=None, metavar="NAME",
                        help="defaults for every option below and the target (explicit options override "
                             "them): " + "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items()))
    preset.add_argument("--full", action="store_true",
                        help="--preset full: the K sweep, the cache workload and 16 prompts (about 4x the "
                             "default's time)")
    preset.add_argument("--quick", action="store_true",
                        help="--preset quick: a smoke run, under a minute on a laptop CPU")
    prompts = b.add_mutually_exclusive_group()
    prompts.add_argument("--workload", metavar="NAME",
                         help="a named prompt set: " + "; ".join(
                             f"{w.name}: {w.description} [{w.count} prompts; {w.licence}]" for w in WORKLOADS.values())
                         + f" (default: the preset's, else {DEFAULT_WORKLOAD})")
    prompts.add_argument("--prompts", metavar="FILE.jsonl",
                         help='your own prompts, one JSON object per line: {"prompt": ...} or {"turns": [...]}, '
                              'optionally "chat": true (render with the chat template) and "id"')
    b.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the sampled setting")
    b.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled setting")
    b.add_argument("--settings", type=_name_list, default=("greedy", "sampled"), help="greedy,sampled")
    b.add_argument("--methods", type=_name_list, default=None, help=methods_help)
    b.add_argument("--cache", default="memory://specdec-bench",
                   help="cache URL for the cache rows (default: in-process memory://)")
    b.add_argument("--cache-prompts", type=_positive_int, default=None,
                   help="prompts in the cache workload before repeats/near-duplicates; default: "
                        + _preset_values("cache_prompts"))
    b.add_argument("--out", type=Path, default=Path("specdec-bench"), help="folder for results.* and plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    srv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve the models over HTTP with OpenAI's API; requests that arrive together share the "
                    "decoding batch. Needs the serve extra: pip install 'specdec[serve]'.",
    )
    _add_model_options(srv)
    s = srv.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; the server has no "
                        "authentication, so listen elsewhere only behind something that has)")
    s.add_argument("--port", type=_port, default=8000, help="default: 8000")
    s.add_argument("--model-name",
                   help="the name clients pass as `model` (default: --target as given, else 'bundled')")
    s.add_argument("--cache", help="cache URL (redis://..., memory://); default: none")
    s.add_argument("--max-batch", type=_positive_int, default=16,
                   help="rows decoded together at most, per engine worker (default: 16)")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="engine processes, each with its own copy of the models and its own batch; requests go "
                        "to the one with the fewest (default: 1, decoding in the server's process). With N "
                        "workers of T --threads each, keep N x T <= the machine's cores")
    s.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting at most, per engine worker; beyond it requests are answered 429 "
                        "(default: 64)")
    s.add_argument("--request-timeout", type=_positive_float, metavar="S",
                   help="each request's deadline in seconds; a request past it is ended (default: none)")
    s.add_argument("--drafter", default=None, help=drafter_help)
    s.add_argument("--num-draft-tokens", type=_k_or_auto, default=None,
                   help='K drafts per step, or "auto" to choose it every step (default: auto)')
    s.add_argument("--compile", action="store_true",
                   help="run decoding steps through torch.compile, compiled before the server listens "
                        "(a minute or two the first time on a small CPU; a restart loads the kept graphs in seconds)")
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")

    # Listed for help only: main() hands `specdec cache ...` to specdec.cache.cli before parsing.
    sub.add_parser("cache", help="inspect and invalidate the cache (stats, invalidate, flush)", add_help=False)
    return parser


# --------------------------------------------------------------------------- subcommands


def _model_paths(args) -> tuple[str, str | None]:
    from .loading import bundled_pair

    draft = args.draft
    if draft is not None and draft.lower() == "none":
        draft = "none"
    if args.target is None:
        if draft not in (None, "none", "random"):
            raise ValueError("--draft needs --target: the bundled target only pairs with the bundled draft")
        target, bundled_draft = bundled_pair()
        return target, (None if draft == "none" else draft if draft == "random" else bundled_draft)
    return args.target, (None if draft in (None, "none") else draft)


def _head_option(args):
    """--head as from_pretrained takes it: a folder, None ('none') or "default"."""
    head = getattr(args, "head", None)
    if head is None:
        return "default"
    return None if head.lower() == "none" else head


def _quiet_transformers() -> None:
    # The command prints its own progress; transformers' loading bars and generate()
    # deprecation notices would interleave with it.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _apply_threads(args) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _check_generate_options(args) -> dict:
    """Every check on `specdec generate`'s options that needs no model; returns generate()'s kwargs."""
    from .drafters import AUTO, NONE, get_drafter_class
    from .params import make_params

    kwargs = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, drafter=args.drafter, num_draft_tokens=args.num_draft_tokens, ignore_eos=args.ignore_eos,
        stop=args.stop,
    )
    make_params(**kwargs)
    names = _drafter_names()
    if args.drafter not in names:
        raise ValueError(f"--drafter {args.drafter!r} is unknown; choose one of {', '.join(names)}")

    def needs_model(name: str) -> bool:
        return name not in (AUTO, NONE) and "model" in get_drafter_class(name).needs

    no_draft = (args.draft or "").lower() == "none" or (args.target is not None and args.draft is None)
    if no_draft and needs_model(args.drafter):
        fix = "drop --draft none" if args.target is None else "pass --draft with a draft model"
        others = [n for n in names if not needs_model(n)]
        raise ValueError(f"--drafter {args.drafter} needs a draft model; {fix} or pick one of {', '.join(others)}")
    if args.cache:
        from .cache.config import parse_cache_url

        parse_cache_url(args.cache)
    if args.device is not None:
        from .bench.config import check_device

        check_device(args.device)
    return kwargs


def cmd_generate(args) -> int:
    """`specdec generate`: one prompt, text on stdout, a stats line on stderr."""
    from . import SpeculativeGenerator

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty; pass text, or '-' to read it from stdin")
    kwargs = _check_generate_options(args)  # before the models load
    target, draft = _model_paths(args)
    _apply_threads(args)
    _quiet_transformers()
    dtype = None if args.dtype in (None, "auto") else args.dtype
    gen = SpeculativeGenerator.from_pretrained(
        target, draft, device=args.device, dtype=dtype, device_map=args.device_map, cache=args.cache,
        numerics=args.numerics, compile=args.compile, head=_head_option(args),
    )
    if args.compile:
        print(f"[compile warm-up: {gen.warmup():.1f}s]", file=sys.stderr)
    if args.stream:
        deltas = gen.stream(prompt, **kwargs)
        while True:
            try:
                delta = next(deltas)
            except StopIteration as done:
                result = done.value
                break
            sys.stdout.write(delta)
            sys.stdout.flush()
    else:
        result = gen.generate(prompt, **kwargs)[0]
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(stats_line(result), file=sys.stderr)
    return 0


def stats_line(result) -> str:
    """One line of the numbers a user looks at after a generation."""
    s = result.stats
    if s.cache_hit:
        # No decoding happened: tokens/s and accepted lengths would be meaningless.
        return (f"[cache hit: {s.new_tokens} tokens in {s.wall_time_s * 1e3:.2f} ms, "
                f"finish={result.finish_reason}]")
    parts = [
        f"{s.new_tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_second:.1f} tok/s)",
        f"finish={result.finish_reason}",
        f"target forwards={s.target_forwards}",
        f"mean accepted length={s.mean_accepted_length:.2f}",
    ]
    if s.drafted_tokens:
        parts.append(f"acceptance={s.acceptance_rate:.2f} ({s.accepted_tokens}/{s.drafted_tokens})")
    if s.cache_errors:
        parts.append(f"cache errors={s.cache_errors}")
    return "[" + ", ".join(parts) + "]"


def _preset_values(field: str) -> str:
    """'4 (full: 4,2,6,8)': a setting's default in the headline preset, then where others differ."""
    from .bench.config import PRESETS

    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    base = getattr(PRESETS["headline"], field)
    others = [f"{name}: {show(getattr(p, field))}" for name, p in PRESETS.items()
              if name != "headline" and getattr(p, field) != base]
    return show(base) + (f" ({', '.join(others)})" if others else "")


def _bench_models(args, preset) -> tuple[str, str | None]:
    """Target and draft of `specdec bench`: --target, else the preset's model, else the bundled pair."""
    if args.target is None and preset.target is not None:
        draft = args.draft
        return preset.target, (None if draft is None or draft.lower() == "none" else draft)
    return _model_paths(args)


def bench_config(args):
    """The BenchConfig of `specdec bench`'s arguments: the preset's values where none was given."""
    from .bench import PRESETS, BenchConfig

    name = args.preset or ("full" if args.full else "quick" if args.quick else "headline")
    target, draft = _bench_models(args, PRESETS[name])
    return BenchConfig.from_preset(
        name,
        target=target,
        draft=draft,
        head=args.head,
        out=args.out,
        device=args.device,
        dtype=None if args.dtype in (None, "auto") else args.dtype,
        device_map=args.device_map,
        numerics=args.numerics,
        num_draft_tokens=args.num_draft_tokens,
        max_new_tokens=args.max_new_tokens,
        num_prompts=args.num_prompts,
        repeats=args.repeats,
        warmup=not args.no_warmup,
        compile=args.compile,
        prompts_file=args.prompts,
        workload=args.workload,
        seed=args.seed,
        temperature=args.temperature,
        settings=args.settings,
        methods=args.methods,
        cache_url=args.cache,
        cache_prompts=args.cache_prompts,
        threads=args.threads,
        progress=not args.no_progress,
        command=_command_line(),
    )


def cmd_bench(args) -> int:
    """`specdec bench`: run the comparison, print the table, write the files."""
    from .bench import Bench, format_duration, headline, markdown_table, step_table, warmup_lines

    _drafter_names()  # a plug-in that does not load is an error here, not in the middle of the run
    config = bench_config(args)
    from .bench import apply_threads

    bench = Bench(config)  # validates the options and reads the prompts before loading models
    threads = apply_threads(args.threads, args.device, args.device_map)
    _quiet_transformers()
    if args.threads is None and threads == 1:
        print("torch threads: 1 per process on CPU (pass --threads N to change)", file=sys.stderr)
    doc = bench.run()
    print(markdown_table(doc["rows"]))
    for line in step_table(doc["rows"]) + warmup_lines(doc["rows"], doc["compile"]):
        print(line)
    print()
    for line in headline(doc["rows"], config.main_k):
        print(line)
    c = doc["cost"].get("c")
    if c is not None:
        print(f"\nc = draft forward / target forward = {c:.3f} "
              f"({doc['cost']['draft_forward_ms']:.2f} ms / {doc['cost']['target_forward_ms']:.2f} ms)")
    for note in doc["notes"]:
        print(f"note: {note}")
    for warning in doc["suspect"]:
        print(f"WARNING: {warning}")
    print(f"\nthe run took {format_duration(doc['elapsed_seconds'])} (model loading included)")
    files = ["results.json", "results.csv", "results.md"] + doc.get("plots", [])
    if doc["partial"]:
        print(f"\ninterrupted: wrote the partial results ({', '.join(files)}) to {config.out}", file=sys.stderr)
        return 130
    print(f"\nwrote {', '.join(files)} to {config.out}")
    return 0


def cmd_serve(args) -> int:
    """`specdec serve`: load the models, then answer HTTP requests until Ctrl-C (which finishes
    the requests in flight first)."""
    try:
        from .serving.app import check_app_options, serve
    except ImportError as exc:
        print(f"specdec serve: error: the server needs the serve extra ({exc}); pip install 'specdec[serve]'",
              file=sys.stderr)
        return 2
    from .params import make_params

    if args.drafter is not None and args.drafter not in (names := _drafter_names()):
        raise ValueError(f"--drafter {args.drafter!r} is unknown; choose one of {', '.join(names)}")
    if args.num_draft_tokens is not None:
        make_params(num_draft_tokens=args.num_draft_tokens)
    model_name = args.model_name if args.model_name is not None else (args.target or "bundled")
    check_app_options(model_name=model_name, request_timeout=args.request_timeout)
    if args.cache:
        from .cache.config import parse_cache_url

        parse_cache_url(args.cache)
    if args.device is not None:
        from .bench.config import check_device

        check_device(args.device)
    target, draft = _model_paths(args)
    _apply_threads(args)
    _quiet_transformers()
    serve(target, draft, host=args.host, port=args.port, cache=args.cache, model_name=model_name,
          max_batch=args.max_batch, max_queue=args.max_queue, request_timeout=args.request_timeout,
          drafter=args.drafter, num_draft_tokens=args.num_draft_tokens, device=args.device,
          dtype=None if args.dtype in (None, "auto") else args.dtype, device_map=args.device_map,
          numerics=args.numerics, compile=args.compile, log_level=args.log_level, head=_head_option(args),
          workers=args.workers, threads=args.threads)
    return 0


def cmd_cache(argv: list[str]) -> int:
    """`specdec cache ...`: delegated to specdec.cache.cli (add_arguments, run), imported lazily."""
    try:
        from .cache import cli as cache_cli
    except ImportError as exc:
        print(f"specdec cache: error: the cache command line is not available in this install ({exc}); "
              "reinstall specdec with its cache package", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="specdec cache", description="Inspect and invalidate the specdec cache.")
    cache_cli.add_arguments(parser)
    cache_args = parser.parse_args(argv)
    return int(cache_cli.run(cache_args) or 0)


def _command_line() -> str:
    """The command as typed, with credentials in URLs replaced by ***."""
    from .cache.config import redact_url

    def clean(arg: str) -> str:
        if "://" in arg:
            head, sep, url = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
            return shlex.quote(head + sep + redact_url(url))
        return shlex.quote(arg)

    return " ".join(["specdec", *(clean(a) for a in sys.argv[1:])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `specdec` console script."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if argv_list[:1] == ["cache"]:
        # Everything after "cache" belongs to the cache command line, --help included.
        return cmd_cache(argv_list[1:])
    parser = build_parser()
    args = parser.parse_args(argv_list)
    if argv is not None:  # called as a function (tests): record the given arguments
        sys_argv, sys.argv = sys.argv, ["specdec", *argv]
    try:
        handler = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve}[args.command]
        return handler(args)
    except (ValueError, OSError) as exc:  # bad arguments, missing files or models
        print(f"specdec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before anything was measured (bench handles its own)
        print(f"specdec {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is not None:
            sys.argv = sys_argv


if __name__ == "__main__":
    sys.exit(main())
