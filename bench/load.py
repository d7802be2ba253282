"""Small HTTP load tools for the benchmarks (standard library only; loopback, bounded in time).

- ``rate(urls, seconds, processes, connections)``: keep-alive GET loop, returns requests per second.
- ``slow_readers(url, n, rate_bytes, seconds)``: n connections each reading ~rate_bytes/s (asyncio).
- ``latencies(url, count, headers)``: sequential request times in seconds.
"""
from __future__ import annotations

import asyncio
import http.client
import multiprocessing as mp
import time
from urllib.parse import urlsplit


def _worker(paths: list[str], host: str, port: int, seconds: float, connections: int, out,
            method: str = "GET") -> None:
    import threading

    counts = [0] * connections
    errors = [0] * connections
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        n = 0
        while time.monotonic() < deadline:
            try:
                conn.request(method, paths[n % len(paths)])
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
                if resp.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=10)
            except OSError:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            n += 1
        conn.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((sum(counts), sum(errors)))


def rate(urls: list[str], seconds: float = 5.0, processes: int = 2, connections: int = 4,
         method: str = "GET") -> tuple[float, int]:
    """Requests per second (200s only) and the number of failed requests."""
    u = urlsplit(urls[0])
    paths = [urlsplit(x).path for x in urls]
    queue: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_worker, args=(paths, u.hostname, u.port, seconds, connections, queue, method))
             for _ in range(processes)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = max(seconds, time.monotonic() - start - 0.2)
    return sum(r[0] for r in results) / elapsed, sum(r[1] for r in results)


statuses: dict[str, int] = {}


async def _slow_reader(host: str, port: int, path: str, rate_bytes: int, seconds: float, got: list[int]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        got.append(-1)
        return
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    total = 0
    deadline = time.monotonic() + seconds
    status = b"none"
    try:
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(rate_bytes // 10), timeout=1)
            except asyncio.TimeoutError:
                continue  # not served yet: keep waiting until the deadline
            if not chunk:
                break
            if total == 0:
                status = chunk.split(b" ", 2)[1] if chunk.startswith(b"HTTP/") else b"?"
            total += len(chunk)
            await asyncio.sleep(0.1)
    except OSError:
        status = b"error"
    finally:
        writer.close()
    got.append(total)
    statuses[status.decode()] = statuses.get(status.decode(), 0) + 1


def slow_readers(urls: list[str], rate_bytes: int, seconds: float) -> tuple[list[int], dict[str, int]]:
    """Run in a thread or process: one slow download per URL; the bytes each received, and the
    statuses seen ("none": no answer before the deadline)."""
    got: list[int] = []

    async def main() -> None:
        tasks = []
        for i, url in enumerate(urls):
            u = urlsplit(url)
            tasks.append(asyncio.create_task(_slow_reader(u.hostname, u.port, u.path, rate_bytes, seconds, got)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)  # ramp up instead of a SYN flood on the backlog
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return got, statuses


def latencies(url: str, count: int, headers: dict[str, str] | None = None) -> list[float]:
    u = urlsplit(url)
    times = []
    for _ in range(count):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        t0 = time.perf_counter()
        conn.request("GET", u.path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t0)
        conn.close()
        assert resp.status == 200, resp.status
    return times
