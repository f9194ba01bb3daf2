"""Load test of `specdec serve`: throughput and latency with 1, 4 and 16 concurrent clients,
Redis killed and restarted mid-run, and two server processes sharing one Redis.

Everything runs on loopback: a throwaway redis-server, `specdec serve` processes on the
bundled pair (one torch thread each), and client threads using the official `openai` client
with streaming. A fixed number of requests per phase (each client sends its next request as
soon as its last one ends), greedy, the shipped held-out prompts:

1. Concurrency levels (1, 4, 16): throughput (completion tokens / wall time), time to first
   token (request sent -> first text chunk) and time per output token ((last chunk - first
   chunk) / (tokens - 1)) per request, p50 and p99. Redis is emptied before each level so
   no level is answered by the response cache of another.
2. Redis killed (SIGKILL) after a quarter of the requests and restarted 1 s later on the same
   port, at the highest concurrency: every request must still succeed and equal its output
   at concurrency 1 (the cache may cost time, never change an answer).
3. Scale-out: two server processes on one Redis, requests alternating between them (what a
   load balancer does). A response one server wrote is a verified hit on the other.

    python benchmarks/serve_load.py                    # writes benchmarks/results/serve_load/
    python benchmarks/serve_load.py --requests 16 --levels 1,4   # quicker

Needs the serve and test extras (fastapi, uvicorn, openai) and redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.05)


class Redis:
    """A throwaway redis-server on loopback that can be killed and restarted on its port."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            sys.exit("redis-server not found (apt-get install -y redis-server)")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, "redis-server")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def flushall(self) -> None:
        # Our own throwaway server: emptied between phases (never done to a user's server).
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
            c.sendall(b"FLUSHALL\r\n")
            assert c.recv(16).startswith(b"+OK")

    def dbsize(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
            c.sendall(b"DBSIZE\r\n")
            return int(c.recv(64)[1:].split(b"\r\n")[0])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?namespace=serve-load"


class Server:
    """One `specdec serve` process on the bundled pair."""

    def __init__(self, cache_url: str, args, log: Path) -> None:
        self.port = free_port()
        self.log = open(log, "w")
        cmd = [sys.executable, "-P", "-m", "specdec.cli", "serve", "--port", str(self.port), "--cache", cache_url,
               "--max-batch", str(args.max_batch), "--threads", str(args.server_threads), "--log-level", "warning",
               "--workers", str(args.workers)]
        if args.compile:
            cmd.append("--compile")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(self.healthy, 600, "specdec serve")
        except BaseException:  # never leave a server behind
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.log.close()
            raise

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"specdec serve exited with {self.proc.returncode}; see {self.log.name}")
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: finishes in-flight requests
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def one_request(client, prompt: str, max_tokens: int, sampling: dict | None = None) -> dict:
    """One streamed completion (greedy unless `sampling` says otherwise); its timings, text,
    token count and speculative stats."""
    sent = time.perf_counter()
    first = last = None
    parts, usage, extra = [], None, None
    sampling = sampling or {"temperature": 0}
    extra_body = {k: v for k, v in sampling.items() if k == "top_k"}
    stream = client.completions.create(model="bundled", prompt=prompt, max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra_body or None,
                                       **{k: v for k, v in sampling.items() if k != "top_k"})
    for chunk in stream:
        now = time.perf_counter()
        text = chunk.choices[0].text if chunk.choices else ""
        if text:
            first = first if first is not None else now
            last = now
            parts.append(text)
        if chunk.usage is not None:
            usage = chunk.usage
        extra = (chunk.model_extra or {}).get("specdec") or extra
    tokens = usage.completion_tokens if usage is not None else 0
    return {
        "text": "".join(parts), "tokens": tokens, "ttft_s": (first - sent) if first is not None else None,
        "tpot_s": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
        "latency_s": time.perf_counter() - sent, "specdec": extra,
    }


def mixed_sampling(i: int) -> dict:
    """Request i of the mixed phase: greedy, or seeded sampling with its own settings."""
    return [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.95, "seed": i},
            {"temperature": 1.0, "top_k": 40, "seed": i}, {"temperature": 0.6, "seed": i}][i % 4]


def run_phase(bases: list[str], prompts: list[str], concurrency: int, max_tokens: int, during=None,
              sampling=None) -> dict:
    """`len(prompts)` requests from `concurrency` client threads (closed loop), round-robin
    over the servers; `during(done_count)` is called after each completed request."""
    import openai

    clients = [openai.OpenAI(base_url=f"{b}/v1", api_key="none", max_retries=0, timeout=300) for b in bases]
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()
    done = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                results[i] = one_request(clients[i % len(clients)], prompts[i], max_tokens,
                                         sampling(i) if sampling is not None else None)
            except Exception as exc:  # noqa: BLE001 - a lost request is what this measures
                with lock:
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
            with lock:
                done[0] += 1
                count = done[0]
            if during is not None:
                during(count)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in ok)

    def pct(values, q):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok]
    return {
        "concurrency": concurrency, "requests": len(prompts), "succeeded": len(ok), "errors": errors,
        "wall_s": wall, "completion_tokens": tokens, "throughput_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99),
        "mean_accepted_length": statistics.mean(
            r["specdec"]["mean_accepted_length"] for r in ok if r["specdec"]) if ok else None,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per phase (default 48)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--levels", default="1,4,16", help="client concurrency levels (default 1,4,16)")
    parser.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch (default 16)")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server (default 1)")
    parser.add_argument("--compile", action="store_true", help="servers run compiled steps (specdec serve --compile)")
    parser.add_argument("--workers", type=int, default=1, help="engine processes per server (specdec serve --workers)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    from specdec.workload import load_builtin

    base_prompts = [p.text for p in load_builtin()]
    prompts = [base_prompts[i % len(base_prompts)] for i in range(args.requests)]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "requests": args.requests, "max_tokens": args.max_tokens, "levels": levels, "server_threads": args.server_threads,
        "compile": args.compile, "workers": args.workers,
    }
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(Path(tmp))
        servers: list[Server] = []
        try:
            servers.append(Server(redis.url, args, Path(tmp) / "server-a.log"))
            base = servers[0].base
            one_request(__import__("openai").OpenAI(base_url=f"{base}/v1", api_key="none"), "def f():", 4)  # warm
            phases = {}
            for c in levels:
                redis.flushall()
                phases[c] = run_phase([base], prompts, c, args.max_tokens)
                p = phases[c]
                print(f"concurrency {c:>2}: {p['throughput_tok_s']:7.1f} tok/s  ttft p50 {p['ttft_p50_s']*1e3:6.0f} ms "
                      f"p99 {p['ttft_p99_s']*1e3:6.0f} ms  tpot p50 {p['tpot_p50_s']*1e3:5.1f} ms "
                      f"p99 {p['tpot_p99_s']*1e3:5.1f} ms  ok {p['succeeded']}/{p['requests']}", flush=True)
            reference = [r["text"] if r else None for r in phases[levels[0]]["results"]]
            report["levels_results"] = {str(c): {k: v for k, v in p.items() if k != "results"} for c, p in phases.items()}
            top = levels[-1]
            report["speedup_top_vs_one"] = phases[top]["throughput_tok_s"] / phases[levels[0]]["throughput_tok_s"]

            # 1b. Mixed sampling settings in one batch: greedy rows and seeded rows with their own
            # temperature / top-k / top-p, at the top concurrency against one client at a time.
            redis.flushall()
            alone = run_phase([base], prompts, levels[0], args.max_tokens, sampling=mixed_sampling)
            redis.flushall()
            mixed = run_phase([base], prompts, levels[-1], args.max_tokens, sampling=mixed_sampling)
            changed_mixed = [i for i, (a, b) in enumerate(zip(alone["results"], mixed["results"]))
                             if a is None or b is None or a["text"] != b["text"]]
            report["mixed_sampling"] = {
                "one_client_tok_s": alone["throughput_tok_s"], "top_tok_s": mixed["throughput_tok_s"],
                "succeeded": mixed["succeeded"], "requests": mixed["requests"], "changed_or_lost": changed_mixed,
            }
            print(f"mixed sampling: {mixed['succeeded']}/{mixed['requests']} ok at {levels[-1]} clients, "
                  f"{len(changed_mixed)} differ from one client at a time, {mixed['throughput_tok_s']:.1f} tok/s "
                  f"(one client {alone['throughput_tok_s']:.1f})", flush=True)

            # 2. Redis killed after a quarter of the requests, restarted a second later.
            redis.flushall()
            events = {}

            def chaos(count: int) -> None:
                if count == max(1, args.requests // 4) and "killed" not in events:
                    events["killed"] = time.perf_counter()
                    redis.kill()

                    def restart() -> None:
                        time.sleep(1.0)
                        redis.start()
                        events["restarted"] = time.perf_counter()

                    threading.Thread(target=restart).start()

            killed = run_phase([base], prompts, top, args.max_tokens, during=chaos)
            wait_until(lambda: "restarted" in events, 30, "redis restart")
            changed = [i for i, r in enumerate(killed["results"]) if r is None or r["text"] != reference[i]]
            report["redis_killed"] = {
                **{k: v for k, v in killed.items() if k != "results"},
                "changed_or_lost": changed, "outage_s": events["restarted"] - events["killed"],
            }
            print(f"redis killed mid-run: {killed['succeeded']}/{killed['requests']} succeeded, "
                  f"{len(changed)} changed or lost, {killed['throughput_tok_s']:.1f} tok/s", flush=True)

            # 3. Two servers, one Redis: requests alternate; a response written by one is a hit on the other.
            redis.flushall()
            servers.append(Server(redis.url, args, Path(tmp) / "server-b.log"))
            two = run_phase([s.base for s in servers], prompts, top, args.max_tokens)
            changed2 = [i for i, r in enumerate(two["results"]) if r is None or r["text"] != reference[i]]
            import openai

            # A prompt neither server has seen: answered by the first, then asked of the second once the
            # first server's write-behind has stored it (its breaker may still be cooling down from the
            # outage above, which delays, never breaks, the write).
            fresh = base_prompts[-1]
            before = redis.dbsize()
            one_request(openai.OpenAI(base_url=f"{servers[0].base}/v1", api_key="none"), fresh, args.max_tokens)
            wait_until(lambda: redis.dbsize() > before, 60, "the first server's cache write")
            crossed = one_request(openai.OpenAI(base_url=f"{servers[1].base}/v1", api_key="none"), fresh,
                                  args.max_tokens)
            report["two_servers"] = {
                **{k: v for k, v in two.items() if k != "results"}, "changed_or_lost": changed2,
                "hit_on_other_server": (crossed["specdec"] or {}).get("cache_kind"),
            }
            print(f"two servers: {two['succeeded']}/{two['requests']} ok, {two['throughput_tok_s']:.1f} tok/s, "
                  f"a request seen by the other server: cache {report['two_servers']['hit_on_other_server']}",
                  flush=True)
            report["metrics_after"] = servers[0].metrics()
        finally:
            for s in servers:
                s.stop()
            redis.stop()
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / "README.md")
    print(f"wrote {args.out}")
    return 0


def write_markdown(report: dict, path: Path) -> None:
    def ms(v):
        return f"{v * 1e3:.0f}" if v is not None else "-"

    def ms1(v):
        return f"{v * 1e3:.1f}" if v is not None else "-"

    lines = [
        "# `specdec serve` under load (bundled pair)", "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cores']} cores ({report['machine']['cpu']}), Python "
        f"{report['machine']['python']}; servers with "
        f"{str(report.get('workers', 1)) + ' engine worker processes of ' if report.get('workers', 1) > 1 else ''}"
        f"{report['server_threads']} torch thread(s) each"
        f"{', compiled steps (--compile, warm-up before listening)' if report.get('compile') else ''}; clients in one "
        "process, same machine.  ",
        f"{report['requests']} streamed greedy completions per phase, max_tokens={report['max_tokens']}, "
        "held-out prompts, one Redis on loopback as the shared cache.", "",
        "| clients | tok/s | x one client | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    one = report["levels_results"][str(report["levels"][0])]["throughput_tok_s"]
    for c, p in report["levels_results"].items():
        lines.append(f"| {c} | {p['throughput_tok_s']:.1f} | {p['throughput_tok_s'] / one:.2f} | {ms(p['ttft_p50_s'])} | "
                     f"{ms(p['ttft_p99_s'])} | {ms1(p['tpot_p50_s'])} | {ms1(p['tpot_p99_s'])} | "
                     f"{p['succeeded']}/{p['requests']} |")
    m = report["mixed_sampling"]
    lines += [
        "",
        f"Mixed sampling (a quarter greedy, three quarters seeded with their own temperature, top-k, top-p): "
        f"{m['succeeded']}/{m['requests']} succeeded at {report['levels'][-1]} clients, "
        f"{len(m['changed_or_lost'])} differ from the same requests sent one at a time; "
        f"{m['top_tok_s']:.1f} tok/s against {m['one_client_tok_s']:.1f} for one client.",
    ]
    k = report["redis_killed"]
    t = report["two_servers"]
    lines += [
        "",
        f"Redis SIGKILLed after a quarter of the requests at {k['concurrency']} clients, restarted "
        f"{k['outage_s']:.1f} s later: {k['succeeded']}/{k['requests']} succeeded, "
        f"{len(k['changed_or_lost'])} changed or lost against the 1-client outputs, {k['throughput_tok_s']:.1f} tok/s.",
        "",
        f"Two server processes sharing the Redis, requests alternating: {t['succeeded']}/{t['requests']} succeeded, "
        f"{len(t['changed_or_lost'])} changed, {t['throughput_tok_s']:.1f} tok/s (both on the same 2 cores); a "
        f"request first answered by one server was a `{t['hit_on_other_server']}` cache hit on the other.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
