"""The operator's view of a real cold start, as a person meets it: a real `hydraserve serve` on
the default model (with an admin token), a cold streaming request whose SSE comments tell the
cold start's progress and whose header names it, its record whose phases add up to the TTFT the
client measured (within 5%), the Prometheus metrics of it, and /dashboard in a real headless
Chromium (Debian's, driven by Selenium) showing its row with its phases; the screenshot is
checked not to be blank (README's docs/dashboard.png is one: HYDRASERVE_SCREENSHOT=PATH keeps
it)."""
from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hydraserve.store.launch import ServerProcess

pytestmark = pytest.mark.multiprocess

MODEL = "smollm2-135m-instruct"
TOKEN = "dash-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    server = ServerProcess(["serve", "--port", "0", "--keep-alive", "300", "--admin-token",
                            TOKEN, "--sse-heartbeat", "0.4", "--log-dir", str(tmp / "logs")],
                           tmp / "gateway.log", timeout=120)
    yield server
    assert server.stop() == 0


def _get(server, path: str, token: str | None = TOKEN):
    req = urllib.request.Request(server.url + path,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body


@pytest.fixture(scope="module")
def cold(server):
    """One cold streaming request: (its response headers, its SSE comment lines before its first
    data chunk, the seconds to that chunk as the client measured them, its comment lines after
    it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
        "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    waiting, streaming, ttft = [], [], None
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith(": "):
            (waiting if ttft is None else streaming).append(line[2:])
        elif line.startswith("data: ") and ttft is None:
            ttft = time.monotonic() - t0
    conn.close()
    return {k.lower(): v for k, v in resp.getheaders()}, waiting, ttft, streaming


def test_a_waiting_stream_is_told_the_progress_of_its_cold_start(cold):
    """Until its first token, each SSE comment tells the stream its cold start's progress. Once
    tokens flow, a pause between two of them longer than the heartbeat (0.4 s here: one decode
    step of a slow or loaded machine) gets a bare keep-alive comment: nothing is waited for."""
    headers, waiting, _, streaming = cold
    iid = headers["x-hydraserve-cold-start"]
    assert iid.startswith(MODEL + "-") and headers["x-request-id"].startswith("chatcmpl-")
    progress = f"cold start {iid}: "
    # the one bare comment a waiting stream may get: the last, sent while its first token,
    # there already (the cold start over), was on its way to the stream
    assert waiting and all(c.startswith(progress) for c in waiting[:-1]), waiting
    assert waiting[-1].startswith(progress) or waiting[-1] == "heartbeat", waiting
    assert all(c == "heartbeat" for c in streaming), streaming
    fetching = [c for c in waiting if "fetching" in c]
    assert fetching, waiting
    percents = [int(c.split("fetching ")[1].split("%")[0]) for c in fetching]
    assert percents == sorted(percents) and percents[-1] > percents[0]  # it moves forward


def test_the_phases_add_up_to_the_ttft_the_client_measured(server, cold):
    headers, _, ttft, _ = cold
    rec = _get(server, "/admin/coldstarts/" + headers["x-hydraserve-cold-start"])
    assert rec["state"] == "serving" and rec["p"] >= 1
    phases = rec["phases"]
    assert list(phases) == ["queue", "placement", "spawn", "imports", "server", "ring",
                            "fetch", "load", "engine", "first_token"]
    assert abs(sum(phases.values()) - ttft) <= 0.05 * ttft, (phases, ttft)
    assert phases["imports"] > 0.5  # the runtime's imports (torch) are on the critical path
    # The steps overlap, so a phase is what its step added to the wait: it ends when the step
    # was done on its last stage, or when the phase before ended if that was later (a fetch
    # that finished while slow imports ran adds nothing). However the machine's speed splits
    # the TTFT, the phases through a step never end before that step did on any stage.
    ends = dict(zip(phases, itertools.accumulate(phases.values())))
    for st in rec["stages"]:
        names = {s["name"] for s in st["segments"]}
        assert {"imports", "fetch", "load"} <= names, st
        for seg in st["segments"]:
            if seg["name"] in ("imports", "fetch", "load"):
                assert ends[seg["name"]] >= min(seg["end"], rec["ttft_s"]) - 1e-3, (phases, st)
        assert st["fetch_bytes"] > 0 and st["fetch_gbps"] > 0
    assert rec["predicted_ttft_s"] > 0
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(server, "/admin/coldstarts/" + headers["x-hydraserve-cold-start"], token="wrong")
    assert e.value.code == 401


def test_the_metrics_hold_the_cold_start(server, cold):
    text = _get(server, "/metrics", token=None).decode()
    lines = text.splitlines()

    def value(prefix: str) -> float:
        (line,) = [ln for ln in lines if ln.startswith(prefix)]
        return float(line.rsplit(" ", 1)[1])

    labels = f'exec_type="hydraserve",model="{MODEL}"'
    counts = [ln for ln in lines if ln.startswith("hydraserve_cold_start_phase_seconds_count{")
              and labels in ln]
    assert len(counts) == 10 and all(ln.endswith(" 1.0") for ln in counts)
    assert value("hydraserve_cold_start_ttft_ratio_count") == 1
    fetched = [ln for ln in lines if ln.startswith("hydraserve_fetched_bytes_total{")]
    assert fetched and all(float(ln.rsplit(" ", 1)[1]) > 0 for ln in fetched)
    booked = [float(ln.rsplit(" ", 1)[1]) for ln in lines
              if ln.startswith("hydraserve_gpu_memory_booked_bytes{")]
    assert len(booked) == 4 and sum(booked) > 0  # the default cluster: 4 servers of 1 GPU
    assert "hydraserve_nic_fetch_bookings{" in text and "hydraserve_warm_runtimes{" in text


def _browser(profile: Path):
    """Headless Chromium with its profile in ``profile`` (a test's tmp_path): left to itself it
    makes one in the temporary folder and leaves it there."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--window-size=1280,1000",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_the_dashboard_shows_the_cold_start_in_a_browser(server, cold, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    iid = cold[0]["x-hydraserve-cold-start"]
    with pytest.raises(urllib.error.HTTPError) as e:  # the page too needs the admin token
        _get(server, "/dashboard", token=None)
    assert e.value.code == 401
    browser = _browser(tmp_path / "chromium-profile")
    try:
        browser.get(f"{server.url}/dashboard?token={TOKEN}")
        row = f'.cold[data-id="{iid}"]'
        # the live page fills in by itself: the cold start's row, its phase bar, a timeline row
        # per stage with its segments
        WebDriverWait(browser, 30).until(
            lambda b: _attrs(b, f"{row} .phase[data-phase]", "data-phase"))
        phases = set(_attrs(browser, f"{row} .phase[data-phase]", "data-phase"))
        assert {"imports", "first_token"} <= phases, phases
        rec = _get(server, f"/admin/coldstarts/{iid}")
        assert len(_attrs(browser, f"{row} .stage-row", "class")) == len(rec["stages"])
        segments = set(_attrs(browser, f"{row} .stage-row .segment", "data-phase"))
        assert segments >= {"fetch", "load"}, segments
        assert MODEL in _text(browser, "models")
        assert _text(browser, "error") == ""
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    _assert_not_blank(shot)
    keep = os.environ.get("HYDRASERVE_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


# The page draws itself again every second (innerHTML): an element found by one call may be gone
# by the next (a stale element), so each read is one script, run between two redraws.
def _attrs(browser, css: str, attr: str) -> list[str | None]:
    return browser.execute_script("return Array.from(document.querySelectorAll(arguments[0]), "
                                  "e => e.getAttribute(arguments[1]))", css, attr)


def _text(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).innerText",
                                  element_id)


def _assert_not_blank(png: Path) -> None:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    w, h = img.size
    assert w >= 800 and h >= 600
    colors = img.getcolors(maxcolors=1 << 20)
    background = max(colors)[1]
    drawn = sum(n for n, c in colors if c != background)
    assert len(colors) > 30 and drawn > 0.05 * w * h, (len(colors), drawn / (w * h))
