"""`specdec cache stats | invalidate | flush`: inspect and invalidate a cache namespace.

    specdec cache stats      [--url URL] [--namespace NS] [--json]
    specdec cache invalidate [--url URL] [--namespace NS] (--all | --model ID_OR_NAME | --key KEY)
    specdec cache flush      [--url URL] [--namespace NS] [--dry-run]

The URL defaults to $SPECDEC_REDIS_URL. `invalidate --all` replaces the namespace
epoch token with a new random one (O(1)); `--model` does the same for one model's
epoch (by fingerprint id, or by the name/path it was loaded from); `--key` deletes one
response key; `flush` deletes every key of the namespace with SCAN + UNLINK. Nothing
here runs FLUSHDB or CONFIG SET.

Everything read from the server (key names, hash fields, model descriptions, server
info) was written by whoever can write to it: text output escapes every character
that is not printable, so no escape sequence reaches the terminal, and JSON output is
ASCII. Error messages name the server by its redacted URL only.

specdec/cli.py wires `specdec cache` to add_arguments() and run(); this module also
runs on its own: `python -m specdec.cache.cli stats --url redis://...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import ENV_URL, default_url, parse_cache_url, redact_url
from .keys import response_key
from .namespace import Namespace
from .store import get_store, release_store

_ADMIN_DEADLINE_MS = 2000.0


def safe(value: Any) -> str:
    """`value` as text with every non-printable character escaped (no terminal control sequences)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"cache URL (default: ${ENV_URL})")
    parser.add_argument("--namespace", default=None, help="namespace (default: from the URL, else 'default')")
    parser.add_argument(
        "--deadline-ms", type=float, default=_ADMIN_DEADLINE_MS, help="timeout per server call in ms (default 2000)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `stats`, `invalidate` and `flush` subcommands to `parser`."""
    sub = parser.add_subparsers(dest="cache_command", metavar="{stats,invalidate,flush}")
    sub.required = True
    stats = sub.add_parser("stats", help="epoch, key counts, models and hit/miss counters of a namespace")
    _common(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    inv = sub.add_parser("invalidate", help="invalidate a namespace, a model or one key")
    _common(inv)
    what = inv.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="every entry of the namespace (epoch bump, O(1))")
    what.add_argument("--model", metavar="ID_OR_NAME", help="entries of one model: fingerprint id or name/path")
    what.add_argument("--key", metavar="KEY", help="one response: its Redis key or its 64-hex digest")
    flush = sub.add_parser("flush", help="delete every key of the namespace (SCAN + UNLINK)")
    _common(flush)
    flush.add_argument("--dry-run", action="store_true", help="count the keys, delete nothing")


def _namespace(args: argparse.Namespace) -> tuple[Any, Namespace]:
    url = args.url or default_url()
    if not url:
        raise ValueError(f"no cache URL: pass --url redis://host:6379/0 or set {ENV_URL}")
    options: dict[str, Any] = {"deadline_ms": args.deadline_ms}
    if args.namespace:
        options["namespace"] = args.namespace
    config = parse_cache_url(url, **options)
    store = get_store(config)
    return store, Namespace(store, config.namespace)


def _stats(ns: Namespace, as_json: bool) -> None:
    report = ns.stats()
    report["server"] = ns.store.admin("server_info")
    if as_json:  # ensure_ascii: control characters come out as \u escapes
        print(json.dumps(report, indent=2, sort_keys=True, default=safe, ensure_ascii=True))
        return
    epoch = report["epoch"]
    print(f"namespace   {safe(report['namespace'])} (epoch {safe(epoch) if epoch else 'none yet: a new one on first use'})")
    server = report["server"]
    print("server      " + ", ".join(f"{safe(k)}={safe(v)}" for k, v in server.items() if k != "db_keys"))
    keys = report["keys"]
    print("keys        " + (", ".join(f"{safe(k)}={v}" for k, v in sorted(keys.items())) if keys else "none"))
    counters = report["counters"]
    hits, misses = counters.get("hits", 0), counters.get("misses", 0)
    rate = f" (hit rate {hits / (hits + misses):.1%})" if hits + misses > 0 else ""
    print("counters    " + (", ".join(f"{safe(k)}={v}" for k, v in sorted(counters.items())) or "none") + rate)
    for model_id, desc in sorted(report["models"].items()):
        role, name = safe(desc.get("role", "?")), safe(desc.get("name_or_path", desc.get("description", "?")))
        print(f"model       {safe(model_id)}  {role:6}  {name}")


def _invalidate(ns: Namespace, args: argparse.Namespace) -> int:
    if args.all:
        print(f"namespace {ns.name}: new epoch {ns.bump()}; every earlier entry is unreachable")
        return 0
    if args.model:
        models = ns.models()
        ids = [m for m, d in models.items() if args.model in (m, d.get("name_or_path"))]
        if not ids and len(args.model) == 32 and all(c in "0123456789abcdef" for c in args.model):
            ids = [args.model]  # a fingerprint id that this namespace has not registered (yet)
        if not ids:
            known = ", ".join(f"{safe(m)} ({safe(d.get('name_or_path'))})" for m, d in models.items()) or "none"
            print(f"error: no model {safe(args.model)!r} in namespace {ns.name}; known: {known}", file=sys.stderr)
            return 1
        for model_id in ids:
            print(f"model {safe(model_id)}: new epoch {ns.bump_model(model_id)}")
        return 0
    key = args.key
    if ":" not in key:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            print(f"error: --key takes a Redis key or a 64-hex digest, got {safe(key)!r}", file=sys.stderr)
            return 2
        key = response_key(ns.name, key)
    existed = ns.delete_key(key)
    print(f"{safe(key)}: {'deleted' if existed else 'not found'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one `specdec cache` subcommand; return the exit status."""
    store = None
    try:
        store, ns = _namespace(args)
        command = args.cache_command
        if command == "stats":
            _stats(ns, args.json)
            return 0
        if command == "invalidate":
            return _invalidate(ns, args)
        if command == "flush":
            n = ns.flush(dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            print(f"namespace {ns.name}: {verb} {n} keys")
            return 0
        print(f"error: unknown cache command {command!r}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): nothing to report
        return 1
    except (ValueError, TypeError) as exc:
        print(f"error: {_scrub(exc, args)}", file=sys.stderr)
        return 2
    except Exception as exc:  # server unreachable, timeouts, server errors
        where = f" ({store.config.describe()})" if store is not None else ""
        print(f"error: cache server failed{where}: {type(exc).__name__}: {_scrub(exc, args)}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            release_store(store)


def _scrub(exc: BaseException, args: argparse.Namespace) -> str:
    """An exception's message, escaped, with the URL's credentials replaced by its redacted form."""
    text = str(exc)
    url = getattr(args, "url", None) or default_url()
    if url:
        from urllib.parse import parse_qsl, unquote, urlsplit

        try:
            parts = urlsplit(url)
            secrets_in_url = [parts.password, url]
            secrets_in_url += [v for k, v in parse_qsl(parts.query) if "pass" in k.lower() or "secret" in k.lower()]
        except ValueError:
            secrets_in_url = [url]
        for secret in filter(None, secrets_in_url):
            for form in {secret, unquote(secret)}:
                if form:
                    text = text.replace(form, redact_url(url) if form == url else "***")
    return safe(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m specdec.cache.cli`."""
    parser = argparse.ArgumentParser(prog="specdec cache", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
