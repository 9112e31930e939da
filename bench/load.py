"""HTTP load: wrk with a generated Lua script, or a small pure-Python fallback.

Both report a :class:`LoadResult`: requests per second, p50 and p99 latency,
the count of every status and of socket errors. With wrk the Lua script counts
statuses in ``response()`` (one Lua state per wrk thread) and its ``done()``
sums them over the threads and prints one JSON line with the percentiles.

Bodies for "every request a new make-up" are
``{"name":"b<n>","materials":[{"name":"m<tag>-<thread>-<n>","concentration":1}]}``:
``<tag>`` is new for each run so no two runs of one broker collide, and each
wrk thread's number comes from ``setup()`` through ``thread:set``, since the
threads do not share a Lua state.

The fallback (one connection per thread, keep-alive, ``http.client``) exists
so the smoke run works where wrk is not installed; the GIL makes it a much
weaker client, so full runs want wrk.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Body = Literal["unique", "fixed", "none"]
Generator = Literal["wrk", "python"]

WRK_TIMEOUT_SECONDS = 10
_JSON_MARK = "BENCH_JSON "
_tags = itertools.count(1)


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, for how long, over how many connections."""

    port: int
    method: str
    path: str
    body: Body
    seconds: float
    connections: int
    threads: int
    fixed_body: bytes = b""


@dataclass(frozen=True)
class Plan:
    """How hard and how long every run of a scenario drives the server."""

    seconds: float
    connections: int
    threads: int
    generator: Generator

    def spec(
        self,
        port: int,
        method: str,
        path: str,
        body: Body,
        fixed_body: bytes = b"",
        seconds: float | None = None,
    ) -> LoadSpec:
        return LoadSpec(
            port=port,
            method=method,
            path=path,
            body=body,
            seconds=self.seconds if seconds is None else seconds,
            connections=self.connections,
            threads=min(self.threads, self.connections),
            fixed_body=fixed_body,
        )

    def run(self, spec: LoadSpec) -> LoadResult:
        return run(spec, self.generator)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)
    generator: str = "wrk"

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def unique_body(tag: str, thread: int, n: int) -> bytes:
    return (
        f'{{"name":"b{n}","materials":[{{"name":"m{tag}-{thread}-{n}","concentration":1}}]}}'
    ).encode()


def run(spec: LoadSpec, generator: Generator) -> LoadResult:
    tag = f"r{next(_tags)}t{time.time_ns() % 10**9}"
    if generator == "wrk":
        return _run_wrk(spec, tag)
    return _run_python(spec, tag)


# -- wrk ------------------------------------------------------------------------------

_LUA_COMMON = """
local threads = {}
tid = 0
statuses = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"statuses":{%s}}\\n',
    MARK, summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout,
    table.concat(parts, ",")))
end
"""

_LUA_UNIQUE = """
local counter = 0

function request()
  counter = counter + 1
  local body = '{"name":"b' .. counter .. '","materials":[{"name":"m' .. TAG .. '-'
    .. tid .. '-' .. counter .. '","concentration":1}]}'
  return wrk.format(METHOD, PATH, HEADERS, body)
end
"""

_LUA_STATIC = """
wrk.method = METHOD
wrk.path = PATH
wrk.headers = HEADERS
wrk.body = BODY
"""


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal holding ``text`` verbatim."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def lua_script(spec: LoadSpec, tag: str) -> str:
    headers = '{["Content-Type"] = "application/json"}' if spec.body != "none" else "{}"
    prelude = "\n".join(
        [
            f"MARK = {_lua_string(_JSON_MARK)}",
            f"TAG = {_lua_string(tag)}",
            f"METHOD = {_lua_string(spec.method)}",
            f"PATH = {_lua_string(spec.path)}",
            f"HEADERS = {headers}",
            f"BODY = {_lua_string(spec.fixed_body.decode()) if spec.body == 'fixed' else 'nil'}",
        ]
    )
    body = _LUA_UNIQUE if spec.body == "unique" else _LUA_STATIC
    return prelude + "\n" + body + _LUA_COMMON


def _run_wrk(spec: LoadSpec, tag: str) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="fb-wrk-") as directory:
        script = Path(directory) / "load.lua"
        script.write_text(lua_script(spec, tag))
        argv = [
            "wrk",
            f"-t{spec.threads}",
            f"-c{spec.connections}",
            f"-d{max(1, round(spec.seconds))}s",
            f"--timeout={WRK_TIMEOUT_SECONDS}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{spec.port}{spec.path}",
        ]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=spec.seconds + 60, check=False
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith(_JSON_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    log.debug("wrk output:\n%s", done.stdout)
    data = json.loads(lines[-1][len(_JSON_MARK) :])
    return LoadResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        statuses={str(k): int(v) for k, v in sorted(data["statuses"].items())},
        socket_errors={k: int(v) for k, v in data["errors"].items() if v},
        generator="wrk",
    )


# -- the pure-Python fallback ----------------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def add(self, latencies: list[float], statuses: Counter[str], errors: Counter[str]) -> None:
        with self.lock:
            self.latencies.extend(latencies)
            self.statuses.update(statuses)
            self.errors.update(errors)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timeout"
    return "read"


def _client_loop(spec: LoadSpec, tag: str, thread: int, deadline: float, tally: _Tally) -> None:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    headers = {"Content-Type": "application/json"} if spec.body != "none" else {}
    connection: http.client.HTTPConnection | None = None
    for n in itertools.count(1):
        if time.monotonic() >= deadline:
            break
        if spec.body == "unique":
            body: bytes | None = unique_body(tag, thread, n)
        else:
            body = spec.fixed_body if spec.body == "fixed" else None
        started = time.perf_counter()
        try:
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", spec.port, timeout=WRK_TIMEOUT_SECONDS
                )
            connection.request(spec.method, spec.path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            statuses[str(response.status)] += 1
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as exc:
            errors[_error_kind(exc)] += 1
            if connection is not None:
                connection.close()
            connection = None
    if connection is not None:
        connection.close()
    tally.add(latencies, statuses, errors)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _run_python(spec: LoadSpec, tag: str) -> LoadResult:
    tally = _Tally()
    started = time.monotonic()
    deadline = started + spec.seconds
    threads = [
        threading.Thread(target=_client_loop, args=(spec, tag, i + 1, deadline, tally), daemon=True)
        for i in range(spec.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies = sorted(tally.latencies)
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        statuses=dict(sorted(tally.statuses.items())),
        socket_errors=dict(tally.errors),
        generator="python",
    )


# -- repeated runs ---------------------------------------------------------------------


@dataclass
class Aggregate:
    """Repeated runs of one scenario: medians of the figures, sums of the counts."""

    runs: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    generator: str
    rps_runs: list[float]
    p99_runs: list[float]

    @classmethod
    def of(cls, results: list[LoadResult]) -> Aggregate:
        if not results:
            raise ValueError("no runs to aggregate")
        statuses: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for result in results:
            statuses.update(result.statuses)
            errors.update(result.socket_errors)
        return cls(
            runs=len(results),
            rps=statistics.median(r.rps for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            requests=sum(r.requests for r in results),
            statuses=dict(sorted(statuses.items())),
            socket_errors=dict(errors),
            generator=results[0].generator,
            rps_runs=[round(r.rps, 1) for r in results],
            p99_runs=[round(r.p99_ms, 2) for r in results],
        )

    def unexpected(self, expected: str) -> str | None:
        """What went wrong, if any status other than ``expected`` or a socket error came back."""
        odd = {s: n for s, n in self.statuses.items() if s != expected}
        problems = []
        if odd:
            problems.append("statuses " + ", ".join(f"{s}: {n}" for s, n in odd.items()))
        if self.socket_errors:
            problems.append(
                "socket errors " + ", ".join(f"{k}: {n}" for k, n in self.socket_errors.items())
            )
        if not self.requests:
            problems.append("no request completed")
        return "; ".join(problems) or None
