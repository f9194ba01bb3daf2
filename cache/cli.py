"""`specdec cache stats | invalidate | flush`: inspect and invalidate a cache namespace.

    specdec cache stats      [--url URL] [--namespace NS] [--json]
    specdec cache invalidate [--url URL] [--namespace NS] (--all | --model ID_OR_NAME | --key KEY)
    specdec cache flush      [--url URL] [--namespace NS] [--dry-run]

The URL defaults to $SPECDEC_REDIS_URL. `invalidate --all` replaces the namespace
epoch token with a new random one (O(1)); `--model` does the same for one model's
epoch (by fingerprint id, or by the name/path it was loaded from); `--key` deletes one
response key; `flush` deletes every key of the namespace with SCAN + UNLINK. Nothing
here runs FLUSHDB or CONFIG SET. With $SPECDEC_CACHE_SECRET set (trusted mode) new
epochs are authenticated records, and `--model NAME` resolves only through model
records authenticated under the secret.

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
    return store, Namespace(store, config.namespace, secret=config.secret)  # $SPECDEC_CACHE_SECRET: trusted mode


class _SkipWrongType:
    """A store whose admin reads skip a key holding the wrong Redis type (a list where a hash
    belongs: anyone who can write to the server can put one there) and name it in `skipped`,
    so that `stats` reports everything else instead of failing whole."""

    _EMPTY = {"get": lambda: None, "hgetall": dict}  # what a skipped key reads as

    def __init__(self, store: Any) -> None:
        self._store = store
        self.skipped: list[str] = []

    def admin(self, op: str, *args: Any) -> Any:
        try:
            return self._store.admin(op, *args)
        except Exception as exc:
            if not _is_wrong_type(exc):
                raise
            if op == "mget":  # several keys: read them one by one, skipping the bad ones
                return [self.admin("get", key) for key in args[0]]
            if op not in self._EMPTY:
                raise
            self.skipped.append(str(args[0]))
            return self._EMPTY[op]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _is_wrong_type(exc: BaseException) -> bool:
    """Redis's WRONGTYPE reply: the key exists but holds another kind of value."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _stats(ns: Namespace, as_json: bool) -> None:
    store, ns.store = ns.store, _SkipWrongType(ns.store)
    try:
        report = ns.stats()
        skipped = sorted(set(ns.store.skipped))
    finally:
        ns.store = store
    report["server"] = ns.store.admin("server_info")
    for key in skipped:
        print(f"warning: key {safe(key)} holds the wrong type of Redis value; skipped it, reporting the rest",
              file=sys.stderr)
    if as_json:  # ensure_ascii: control characters come out as \u escapes
        report["skipped_keys"] = skipped
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
        flag = "" if desc.get("authenticated") or not ns.signed else "  (not authenticated: ignored by --model NAME)"
        print(f"model       {safe(model_id)}  {role:6}  {name}{flag}")


def _invalidate(ns: Namespace, args: argparse.Namespace) -> int:
    if args.all:
        print(f"namespace {ns.name}: new epoch {ns.bump()}; every earlier entry is unreachable")
        return 0
    if args.model:
        return _invalidate_model(ns, args.model)
    key = args.key
    if ":" not in key:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            print(f"error: --key takes a Redis key or a 64-hex digest, got {safe(key)!r}", file=sys.stderr)
            return 2
        key = response_key(ns.name, key)
    existed = ns.delete_key(key)
    print(f"{safe(key)}: {'deleted' if existed else 'not found'}")
    return 0


def _is_fingerprint_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _invalidate_model(ns: Namespace, wanted: str) -> int:
    """Bump one model's epoch, naming the model by name/path or by id; print the id bumped.

    With a secret the name resolves only through registry records authenticated under
    it (anyone who can write to the server can add or rewrite the others); without one
    every record counts, and the output says so (harmless there: verified mode checks
    every cached answer). An ambiguous or unknown name is refused, never guessed.
    """
    records = ns.models()
    usable = {m: d for m, d in records.items() if d.get("authenticated") or not ns.signed}
    named = sorted(m for m, d in usable.items() if d.get("name_or_path") == wanted)
    if len(named) > 1:
        ids = ", ".join(safe(m) for m in named)
        print(
            f"error: model name {safe(wanted)!r} is ambiguous in namespace {ns.name} (ids {ids}); "
            "pass one id with --model ID",
            file=sys.stderr,
        )
        return 1
    if named:
        model_id = named[0]
    elif wanted in usable or _is_fingerprint_id(wanted):
        model_id = wanted  # an exact id names itself (registered or not yet)
    else:
        known = ", ".join(f"{safe(m)} ({safe(d.get('name_or_path'))})" for m, d in sorted(usable.items())) or "none"
        ignored = len(records) - len(usable)
        extra = f"; {ignored} unauthenticated record(s) ignored" if ignored else ""
        which = "authenticated models" if ns.signed else "known"
        print(f"error: no model {safe(wanted)!r} in namespace {ns.name}; {which}: {known}{extra}", file=sys.stderr)
        return 1
    desc = usable.get(model_id)
    name = f" ({safe(desc.get('name_or_path'))})" if desc and desc.get("name_or_path") is not None else ""
    note = "" if ns.signed else (
        "; the model registry is unauthenticated without a secret (harmless: verified mode checks every cached answer)"
    )
    print(f"model {safe(model_id)}{name}: new epoch {ns.bump_model(model_id)}{note}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one `specdec cache` subcommand; return the exit status."""
    store = None
    try:
        _check_args(args)
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


def _check_args(args: argparse.Namespace) -> None:
    """ValueError for an option given but empty: argparse takes `--model ''`, and an empty
    value would otherwise fall through to a default (another namespace, another URL) or
    to a different subcommand's path."""
    hints = {
        "url": f"a cache URL such as redis://127.0.0.1:6379/0, or leave --url out to use ${ENV_URL}",
        "namespace": "a namespace name, or leave --namespace out for the URL's (else 'default')",
        "model": "a model's fingerprint id or the name/path it was loaded from (see `specdec cache stats`)",
        "key": "a response's Redis key or its 64-hex digest",
    }
    for option, hint in hints.items():
        value = getattr(args, option, None)
        if value is not None and not value.strip():
            raise ValueError(f"--{option} is empty; pass {hint}")


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
