"""The dashboard in a real browser (Debian's headless Chromium, driven by selenium) against the
real server on the demo model, inside a real 1 GiB memory cgroup: the page loads with no
console errors and shows the model loaded; a burst of requests moves its generation count and
tokens/s; memory pushed to Critical by another process in the cgroup turns the tier badge to
Critical and the refusal count up. Screenshots go to target/dashboard-screenshots/."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

SHOTS = ROOT / "target/dashboard-screenshots"
# Warning below 0.6 GB, Critical below 0.4, Emergency below 0.25, in a 1 GiB cgroup.
TIERS = {
    "PENSIEVE_MEMORY__WARNING_GB": "0.6",
    "PENSIEVE_MEMORY__CRITICAL_GB": "0.4",
    "PENSIEVE_MEMORY__EMERGENCY_GB": "0.25",
    "PENSIEVE_MEMORY__SAMPLE_INTERVAL_MS": "50",
}
ALLOCATOR = """
import ctypes, sys
chunks = []
for line in sys.stdin:
    cmd, _, n = line.strip().partition(" ")
    if cmd == "alloc":
        chunks.append(b"\\x01" * (int(n) << 20))
    elif cmd == "free":
        chunks.clear()
        ctypes.CDLL(None).malloc_trim(0)
    print("ok", flush=True)
"""


class Cgroup:
    """A cgroup v1 memory cgroup with a limit (as tests/common/cgroup.rs makes them)."""

    def __init__(self, limit: int):
        base = Path("/sys/fs/cgroup/memory")
        assert (base / "memory.limit_in_bytes").exists(), "no cgroup v1 memory hierarchy (root needed)"
        self.dir = base / f"pensieve-dashboard-{os.getpid()}"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "memory.limit_in_bytes").write_text(str(limit))

    def prefix(self):
        return ["sh", "-c", f'echo $$ > {self.dir}/cgroup.procs && exec "$@"', "sh"]

    def remove(self):
        for _ in range(100):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def wait_for(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def text(driver, id_):
    return driver.find_element(By.ID, id_).text


def health(server):
    with urllib.request.urlopen(server.url + "/health") as res:
        return json.load(res)


def ask(server, max_tokens):
    body = {"model": "demo", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Tell me a story."}]}
    req = urllib.request.Request(server.url + "/v1/messages", json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def cgroup_server():
    cg = Cgroup(1 << 30)
    server = Server(TIERS, prefix=cg.prefix())
    yield cg, server
    server.stop()
    cg.remove()


def test_the_dashboard_shows_memory_models_and_work_live(cgroup_server):
    cg, server = cgroup_server
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = browser()
    allocator = None
    try:
        driver.get(server.url + "/")
        wait_for("the tier badge says Safe", lambda: text(driver, "tier") == "Safe")
        row = wait_for("the demo model's row", lambda: driver.find_elements(By.CSS_SELECTOR, 'tr[data-model="demo"] td.state'))
        assert row[0].text == "loaded"
        driver.save_screenshot(str(SHOTS / "1-loaded.png"))
        before = int(text(driver, "generations"))

        # A burst: six requests at once; the page's generation count and tokens/s move.
        burst = [threading.Thread(target=ask, args=(server, 200)) for _ in range(6)]
        for t in burst:
            t.start()
        # Tokens are counted as they are generated: the page's rate is above 0 while they run.
        wait_for("tokens/s above 0", lambda: float(text(driver, "tps") or 0) > 0)
        for t in burst:
            t.join()
        wait_for("6 more generations on the page", lambda: int(text(driver, "generations")) >= before + 6)
        # A request is recent once its span has closed, after its response: a poll or two later.
        recent = wait_for("6 recent requests", lambda: (rows := driver.find_elements(By.CSS_SELECTOR, "#recent tr")) and len(rows) >= 6 and rows)
        assert "/v1/messages" in recent[0].text, [r.text for r in recent]
        driver.save_screenshot(str(SHOTS / "2-burst.png"))
        refusals = int(text(driver, "refusals"))

        # Another process in the cgroup takes memory until the server says Critical.
        allocator = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cg.dir}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", ALLOCATOR],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while health(server)["memory"]["status"] not in ("Critical", "Emergency"):
            assert time.monotonic() < deadline, health(server)
            allocator.stdin.write("alloc 20\n")
            allocator.stdin.flush()
            assert allocator.stdout.readline().strip() == "ok", "the allocator died"
            time.sleep(0.1)
        assert ask(server, 4) == 503
        wait_for("the badge says Critical", lambda: text(driver, "tier") in ("Critical", "Emergency"))
        wait_for("the refusal count went up", lambda: int(text(driver, "refusals")) > refusals)
        driver.save_screenshot(str(SHOTS / "3-critical.png"))

        # No console errors on the page through all of it.
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        if allocator is not None:
            allocator.kill()
            allocator.wait()
        driver.quit()


def test_with_api_keys_the_page_and_its_data_need_the_key(keyed_server):
    for path in ("/", "/dashboard", "/dashboard/snapshot"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(keyed_server.url + path)
        assert refused.value.code == 401, path
    req = urllib.request.Request(keyed_server.url + "/dashboard/snapshot", headers={"x-api-key": "sk-local"})
    with urllib.request.urlopen(req) as res:
        snapshot = json.load(res)
    assert snapshot["health"]["backend"]["ready"] is True
    assert "pensieve_requests_total" in snapshot["metrics"]
    # The page asks for the key, then shows the data with it.
    driver = browser()
    try:
        driver.get(keyed_server.url + "/")
        wait_for("the key form", lambda: driver.find_element(By.ID, "keyform").is_displayed())
        driver.find_element(By.ID, "key").send_keys("sk-local")
        driver.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait_for("data with the key", lambda: text(driver, "tier") == "Safe")
        assert not driver.find_element(By.ID, "keyform").is_displayed()
    finally:
        driver.quit()


def test_the_page_is_small_and_can_be_switched_off():
    page = (ROOT / "src/api/dashboard/index.html").read_bytes()
    assert len(page) < 200_000, len(page)
    off = Server({"PENSIEVE_DASHBOARD__ENABLED": "false"})
    try:
        for path in ("/", "/dashboard/snapshot"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(off.url + path)
            assert missing.value.code == 404, path
    finally:
        off.stop()
