"""Hostile clients against `trt-gemma serve` (its own process, on 127.0.0.1): /health latency while each kind of
hostile request is handled, RSS before / peak / after, connections held by idle sockets, 5xx count, and Retry-After
against the measured drain time of a full queue.

For each hostile kind (tests/live_server.hostile_requests: huge stop strings, prompts, message lists, token-id lists,
nesting, ...) the request is sent again and again for --seconds while another client polls /health over a kept-alive
connection; p50 / p99 / max of those /health latencies are printed (goal: p99 < 100 ms). Then --sockets idle sockets
and as many half-sent headers are opened at once, client hang-ups mid-upload and broken chunked bodies are sent, and
RSS is sampled every 20 ms throughout. The server runs with --nofile open files (the 256 of the original report) and a
2 s header timeout.

The guard rows (a second server with `--guard default --guard-mode annotate`, the embedded model as guard): guarded
chat latency idle and while 40 clients send /v1/moderations without pause (goal: p99 <= 2x idle), /health meanwhile
(goal: p99 <= 50 ms), the moderation answers (200 / 429), RSS idle and after the burst (goal: within 20 %), four
rounds of 16 moderation inputs of the largest size that can fit, and clients that give up after 1 s (their queued
inputs must be dropped, not scored).

  python benchmarks/serve_abuse.py [--model DIR] [--seconds 2] [--sockets 300] [--nofile 256] [--json]
                                   [--guard-seconds 10] [--only guard|hostile]
With no --model: the embedded default model when it is installed, else the tiny test model from tests/tiny.py.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
HI = [{"role": "user", "content": "hi"}]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latency_row(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * pct(lat, 0.99),
            "max_ms": 1e3 * max(lat)}


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def held_connections(pid: int, port: int) -> int:
    import psutil

    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def poll_health(url: str, seconds: float) -> list[float]:
    import httpx

    lat, end = [], time.monotonic() + seconds
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.get(url + "/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.005)
    return lat


def sockets_phase(srv, n: int, header_timeout: float) -> dict:
    """n idle sockets and n half-sent headers at once, /health polled meanwhile on a connection opened before; a
    new client's /health time just after the flood; connections held just after and after the header timeout."""
    import httpx

    socks = []
    lat: list[float] = []
    poller = threading.Thread(target=lambda: lat.extend(poll_health(srv.url, header_timeout + 2.0)))
    poller.start()
    time.sleep(0.2)
    try:
        for i in range(2 * n):
            try:
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                if i % 2:
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(s)
            except OSError:
                pass
        t0 = time.perf_counter()
        httpx.get(srv.url + "/health", timeout=60)
        new_client_ms = 1e3 * (time.perf_counter() - t0)
        time.sleep(0.5)
        early = held_connections(srv.proc.pid, srv.port)
        poller.join()
        late = held_connections(srv.proc.pid, srv.port)
    finally:
        for s in socks:
            s.close()
    return {"opened": len(socks), "new_client_health_ms": new_client_ms, "held_after_0.5s": early,
            f"held_after_{header_timeout + 2:g}s": late,
            **latency_row(lat)}


def faults_phase(srv, key: str, n: int) -> dict:
    """n clients that hang up mid-upload and n broken chunked bodies, /health polled meanwhile."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
            b"\r\nContent-Type: application/json\r\n")
    lat: list[float] = []
    poller = threading.Thread(target=lambda: lat.extend(poll_health(srv.url, 2.0)))
    poller.start()
    for i in range(n):
        for tail in (b"Content-Length: 1000\r\n\r\n{\"model\": ", b"Transfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n"):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(head + tail)
            time.sleep(0.01)
            s.close()
    poller.join()
    return {"requests": 2 * n, **latency_row(lat)}


def retry_after_phase(url: str, key: str, model: str, max_tokens: int) -> dict:
    """Fill the 2 slots + the queue of 4 twice (the first fill measures the service rate), then compare the 429's
    Retry-After with the time the queue took to drain."""
    import asyncio

    import httpx

    body = {"model": model, "prompt": "fox", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    hdrs = {"Authorization": f"Bearer {key}"}

    async def fill() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=url, timeout=300, headers=hdrs) as c:
            async def one():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    await r.aread()
                return time.monotonic()
            tasks = [asyncio.ensure_future(one()) for _ in range(6)]
            while True:
                m = (await c.get("/metrics")).text
                if "num_requests_waiting{" in m and any(line.startswith("num_requests_waiting{")
                                                        and line.endswith(" 4.0") for line in m.splitlines()):
                    break
                await asyncio.sleep(0.02)
            r = await c.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
            t429 = time.monotonic()
            ends = await asyncio.gather(*tasks)
            return int(r.headers.get("retry-after", -1)), max(ends) - t429

    asyncio.run(fill())
    ra, drain = asyncio.run(fill())
    return {"retry_after_s": ra, "drain_s": drain}


MODERATION_TEXT = "Is it fine to say that my neighbour's dog barks too much at night? " * 3


def _loop_posts(url: str, path: str, body: dict, headers: dict, end: float, out: list, timeout: float = 60,
                polite: bool = False) -> None:
    """POST once, then again and again until `end`; appends (status, seconds) per request. `polite`: after a 429,
    wait its Retry-After first (as the openai client does), but not past `end`."""
    import httpx

    with httpx.Client(timeout=timeout, headers=headers) as c:
        while True:
            t0 = time.perf_counter()
            try:
                r = c.post(url + path, json=body)
                out.append((r.status_code, time.perf_counter() - t0))
                if polite and r.status_code == 429:
                    time.sleep(max(0.0, min(float(r.headers.get("retry-after", 1)), end - time.monotonic())))
            except httpx.HTTPError as e:
                out.append((type(e).__name__, time.perf_counter() - t0))
            if time.monotonic() >= end:
                return


def _guarded_chats(url: str, headers: dict, n: int | None, end: float | None) -> list[float]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0}
    rows: list = []
    if n is not None:
        for _ in range(n):
            _loop_posts(url, "/v1/chat/completions", body, headers, 0.0, rows)
    else:
        _loop_posts(url, "/v1/chat/completions", body, headers, end, rows)
    assert all(st == 200 for st, _ in rows), f"guarded chat failed: {sorted({str(st) for st, _ in rows})}"
    return [t for _, t in rows]


def guard_burst(srv, headers: dict, seconds: float, clients: int, polite: bool) -> dict:
    """`clients` moderation clients without pause (`polite`: waiting Retry-After after a 429), one guarded-chat
    client and one /health poller, for `seconds`."""
    end = time.monotonic() + seconds
    mods: list = []
    chats: list[float] = []
    health: list[float] = []
    threads = [threading.Thread(target=_loop_posts, args=(srv.url, "/v1/moderations", {"input": MODERATION_TEXT},
                                                          headers, end, mods, 60, polite)) for _ in range(clients)]
    threads.append(threading.Thread(target=lambda: chats.extend(_guarded_chats(srv.url, headers, None, end))))
    threads.append(threading.Thread(target=lambda: health.extend(poll_health(srv.url, seconds))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes: dict = {}
    for st, _ in mods:
        codes[str(st)] = codes.get(str(st), 0) + 1
    return {"chat": latency_row(chats), "health": latency_row(health), "moderations": codes}


def guard_phase(ckpt: Path, ctx: int, tmp: Path, key_file: Path, seconds: float, clients: int = 40) -> dict:
    import httpx

    from live_server import ServerProcess

    out: dict = {}
    srv = ServerProcess([str(ckpt), "--model-name", "bench", "--api-key-file", str(key_file), "--max-concurrency",
                         "2", "--max-queue", "4", "--guard", "default", "--guard-mode", "annotate"],
                        tmp / "guard-server.log", env={"TRT_GEMMA_CACHE": str(tmp / "guard-cache")})
    headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
    with srv:
        _guarded_chats(srv.url, headers, 5, None)  # the guard loads in the background: the first one waits for it
        time.sleep(1.0)
        out["rss_idle_mib"] = srv.rss() / 2**20
        # idle right before each burst: the host's other load drifts, the ratio compares neighbours
        for name, polite in (("burst_retry_after", True), ("burst_no_pause", False)):
            idle = _guarded_chats(srv.url, headers, 20, None)
            out[name] = {"chat_idle": latency_row(idle), **guard_burst(srv, headers, seconds, clients, polite)}
        time.sleep(1.5)
        out["rss_after_burst_mib"] = srv.rss() / 2**20
        big = {"input": "word " * (ctx * 32 // 5)}  # the most characters an input may have (serve/limits.py)
        for _ in range(4):
            rows: list = []
            ts = [threading.Thread(target=_loop_posts, args=(srv.url, "/v1/moderations", big, headers,
                                                             0.0, rows)) for _ in range(16)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        out["large_inputs"] = sorted({str(st) for st, _ in rows})
        time.sleep(1.5)
        out["rss_after_large_mib"] = srv.rss() / 2**20
        before = srv.metrics()
        gone: list = []
        ts = [threading.Thread(target=_loop_posts, args=(srv.url, "/v1/moderations", {"input": [MODERATION_TEXT] * 4},
                                                         headers, 0.0, gone, 1.0))
              for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        time.sleep(3.0)
        after = srv.metrics()
        scored = ("guard_latency_seconds_count", (("stage", "moderation"),))
        out["gave_up"] = {"clients": len(gone), "inputs": 4 * len(gone),
                          "scored": after.get(scored, 0) - before.get(scored, 0),
                          "dropped": after[("guard_dropped_total", ())] - before[("guard_dropped_total", ())]}
        out["rejected_total"] = after[("guard_rejected_total", ())]
        out["over_body_bound"] = httpx.post(srv.url + "/v1/moderations", headers=headers, timeout=60,
                                            json={"input": "x" * (1 << 20)}).status_code
    return out


def error_counts(srv) -> dict:
    m = srv.metrics()
    codes = {dict(k[1])["http_code"]: v for k, v in m.items() if k[0] == "request_error_total"}
    return {"5xx": sum(v for c, v in codes.items() if c.startswith("5")), "by_code": codes}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=2.0, help="how long each hostile kind is repeated")
    ap.add_argument("--sockets", type=int, default=300, help="idle sockets (and as many half headers) at once")
    ap.add_argument("--nofile", type=int, default=256, help="the server's open-file limit")
    ap.add_argument("--guard-seconds", type=float, default=10.0, help="how long the moderation burst lasts")
    ap.add_argument("--only", choices=["hostile", "guard"], default=None, help="run one half only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from serve_overhead import as_checkpoint, default_model

    from trt_gemma.runtime.reference import ReferenceBackend

    key, out = "bench-key", {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ckpt = as_checkpoint(args.model or default_model(tmp), tmp)
        ctx = ReferenceBackend.load(ckpt, slots=1).info.context_length
        (tmp / "key").write_text(key)
        out["context_length"] = ctx
        if args.only != "guard":
            out.update(hostile_phase(ckpt, ctx, tmp, key, args))
        if args.only != "hostile":
            out["guard"] = guard_phase(ckpt, ctx, tmp, tmp / "key", args.guard_seconds)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        report(out)
    return out


def hostile_phase(ckpt: Path, ctx: int, tmp: Path, key: str, args) -> dict:
    import httpx

    from live_server import ServerProcess, health_during, hostile_requests

    out: dict = {}
    srv = ServerProcess([str(ckpt), "--model-name", "bench", "--api-key-file", str(tmp / "key"),
                         "--header-timeout", "2", "--max-concurrency", "2", "--max-queue", "4"],
                        tmp / "server.log", nofile=args.nofile)
    with srv:
        auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        for _ in range(3):
            httpx.post(srv.url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": "bench", "messages": HI, "max_tokens": 4})
        out["rss_small_requests_mib"] = srv.rss() / 2**20
        cases = hostile_requests(ctx, "bench")
        httpx.post(srv.url + cases["prompt_at_char_bound"][0], content=cases["prompt_at_char_bound"][1],
                   headers=auth, timeout=60)
        time.sleep(1.0)
        out["rss_idle_mib"] = srv.rss() / 2**20
        out["health_idle"] = latency_row(poll_health(srv.url, 1.0))
        sampler = RssSampler(srv.proc.pid)
        sampler.start()
        out["hostile"] = {}
        for name, (path, raw, _want) in cases.items():
            statuses, lat = health_during(srv.url, path, raw, headers=auth, repeat_s=args.seconds)
            out["hostile"][name] = {"requests": len(statuses),
                                    "statuses": sorted({str(s) for s in statuses}), **latency_row(lat)}
        out["sockets"] = sockets_phase(srv, args.sockets, 2.0)
        out["client_faults"] = faults_phase(srv, key, 20)
        time.sleep(1.5)
        sampler.stop.set()
        out["rss_peak_mib"] = sampler.peak / 2**20
        out["rss_after_mib"] = srv.rss() / 2**20
        out["errors"] = error_counts(srv)
        out["retry_after"] = retry_after_phase(srv.url, key, "bench", max_tokens=ctx // 2)
        out["log_bytes"] = len(srv.output())
    return out


def report(out: dict) -> None:
    if "hostile" in out:
        report_hostile(out)
    if "guard" in out:
        report_guard(out["guard"])


def report_guard(g: dict) -> None:
    print("guard (embedded model as guard, annotate mode), 40 moderation clients:")
    for name, how in (("burst_retry_after", "waiting Retry-After after a 429"), ("burst_no_pause", "never pausing")):
        b = g[name]
        idle, busy = b["chat_idle"], b["chat"]
        print(f"  clients {how}: guarded chat p50 / p99 / max (ms) idle {idle['p50_ms']:.0f} / {idle['p99_ms']:.0f} / "
              f"{idle['max_ms']:.0f} (n {idle['n']}), busy {busy['p50_ms']:.0f} / {busy['p99_ms']:.0f} / "
              f"{busy['max_ms']:.0f} (n {busy['n']}): p99 {busy['p99_ms'] / idle['p99_ms']:.2f}x idle (goal <= 2x); "
              f"/health p50 / p99 / max {b['health']['p50_ms']:.1f} / {b['health']['p99_ms']:.1f} / "
              f"{b['health']['max_ms']:.1f} (goal p99 <= 50); moderations {b['moderations']}")
    print(f"  RSS MiB: idle {g['rss_idle_mib']:.0f}, after the bursts {g['rss_after_burst_mib']:.0f} "
          f"({g['rss_after_burst_mib'] / g['rss_idle_mib']:.2f}x, goal <= 1.2x), after 4 x 16 largest inputs "
          f"{g['rss_after_large_mib']:.0f} ({g['rss_after_large_mib'] / g['rss_idle_mib']:.2f}x; answers "
          f"{','.join(g['large_inputs'])}); a 1 MiB input: {g['over_body_bound']}; 429s in all "
          f"{g['rejected_total']:.0f}")
    u = g["gave_up"]
    print(f"  {u['clients']} clients with {u['inputs']} inputs gave up after 1 s: {u['scored']:.0f} inputs scored, "
          f"{u['dropped']:.0f} guard jobs (one per policy) dropped")


def report_hostile(out: dict) -> None:
    print(f"context {out['context_length']} tokens; /health latency (ms) while each hostile kind is handled:")
    print(f"  {'kind':<22}{'reqs':>6}{'polls':>7}{'p50':>8}{'p99':>8}{'max':>8}  statuses")
    rows = [("(idle)", {"requests": 0, "statuses": [], **out["health_idle"]})] + list(out["hostile"].items())
    for name, r in rows:
        print(f"  {name:<22}{r['requests']:>6}{r['n']:>7}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['max_ms']:>8.1f}  "
              f"{','.join(r['statuses'])}")
    s = out["sockets"]
    held = [k for k in s if k.startswith("held_after_")]
    print(f"  {'idle+half-header socks':<22}{s['opened']:>6}{s['n']:>7}{s['p50_ms']:>8.1f}{s['p99_ms']:>8.1f}"
          f"{s['max_ms']:>8.1f}  held: {s[held[0]]} ({held[0][11:]}), {s[held[1]]} ({held[1][11:]}); "
          f"a new client's /health: {s['new_client_health_ms']:.0f} ms")
    f = out["client_faults"]
    print(f"  {'hang-ups, bad chunks':<22}{f['requests']:>6}{f['n']:>7}{f['p50_ms']:>8.1f}{f['p99_ms']:>8.1f}"
          f"{f['max_ms']:>8.1f}")
    print(f"RSS MiB: after small requests {out['rss_small_requests_mib']:.0f}, idle (after a max-size prompt) "
          f"{out['rss_idle_mib']:.0f}, peak {out['rss_peak_mib']:.0f}, after {out['rss_after_mib']:.0f} "
          f"({out['rss_after_mib'] / out['rss_idle_mib']:.2f}x idle)")
    print(f"errors by HTTP code: {out['errors']['by_code']}; 5xx: {out['errors']['5xx']:.0f}; "
          f"server log: {out['log_bytes']} bytes")
    ra = out["retry_after"]
    print(f"Retry-After {ra['retry_after_s']} s for a full queue that drained in {ra['drain_s']:.2f} s")


if __name__ == "__main__":
    main()
