"""What several benchmarks measure the same way: the machine's name and the gateway's overhead."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from hydraserve.httpjson import stream


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def gateway_overhead_ms(url: str, model: str, head_url, n: int = 30) -> float | None:
    """Median time the gateway adds to a warm 1-token request, ms: the same request through
    POST /v1/completions and straight to the instance head's /generate, interleaved, both over
    plain HTTP (http.client), so client libraries do not count. ``head_url()`` finds the head
    once the first request made the model warm (None: no overhead measured)."""
    import http.client

    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": model, "prompt": [10, 11, 12], "max_tokens": 1}).encode()

    def via() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/completions", body=body,
                  headers={"Content-Type": "application/json"})
        c.getresponse().read()
        c.close()

    via()
    head = head_url()
    if head is None:
        return None
    diffs = []
    for _ in range(n):
        t = time.perf_counter()
        via()
        t_via = time.perf_counter() - t
        t = time.perf_counter()
        list(stream(head, "/generate", {"prompt_ids": [10, 11, 12], "max_tokens": 1}))
        diffs.append(t_via - (time.perf_counter() - t))
    return statistics.median(diffs) * 1000
