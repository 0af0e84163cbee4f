"""Hostile clients against `trt-gemma serve` (its own process, on 127.0.0.1): /health latency while each kind of
hostile request is handled, RSS before / peak / after, connections held by idle sockets, 5xx count, and Retry-After
against the measured drain time of a full queue.

For each hostile kind (tests/live_server.hostile_requests: huge stop strings, prompts, message lists, token-id lists,
nesting, ...) the request is sent again and again for --seconds while another client polls /health over a kept-alive
connection; p50 / p99 / max of those /health latencies are printed (goal: p99 < 100 ms). Then --sockets idle sockets
and as many half-sent headers are opened at once, client hang-ups mid-upload and broken chunked bodies are sent, and
RSS is sampled every 20 ms throughout. The server runs with --nofile open files (the 256 of the original report) and a
2 s header timeout.

  python benchmarks/serve_abuse.py [--model DIR] [--seconds 2] [--sockets 300] [--nofile 256] [--json]
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
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import httpx

    from live_server import ServerProcess, health_during, hostile_requests
    from serve_overhead import as_checkpoint, default_model

    from trt_gemma.runtime.reference import ReferenceBackend

    key, out = "bench-key", {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ckpt = as_checkpoint(args.model or default_model(tmp), tmp)
        ctx = ReferenceBackend.load(ckpt, slots=1).info.context_length
        (tmp / "key").write_text(key)
        srv = ServerProcess([str(ckpt), "--model-name", "bench", "--api-key-file", str(tmp / "key"),
                             "--header-timeout", "2", "--max-concurrency", "2", "--max-queue", "4"],
                            tmp / "server.log", nofile=args.nofile)
        with srv:
            auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
            for _ in range(3):
                httpx.post(srv.url + "/v1/chat/completions", headers=auth, timeout=60,
                           json={"model": "bench", "messages": HI, "max_tokens": 4})
            out["context_length"] = ctx
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
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        report(out)
    return out


def report(out: dict) -> None:
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
