"""End-to-end tests of the playground `persona serve` serves at `/` (issue 17), in headless
Chromium (Debian's chromium + chromedriver, driven by Selenium), against `persona serve` on
127.0.0.1 with the default model and its shipped vectors. (The tiny fixture models have no
tokenizer or chat template, so they cannot chat.) Screenshots of each state are written to
target/playground-screenshots/ as test artifacts.

Run by scripts/test.sh (which installs chromium, chromium-driver and selenium); alone:
    PYTHONPATH= pytest tests/e2e
A missing resource fails under PERSONA_REQUIRE and is SKIPPED elsewhere.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "persona"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "persona"
MODEL = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
VECTORS = ROOT / "vectors" / "smollm2-135m-instruct"
SHOTS = ROOT / "target" / "playground-screenshots"
PROMPT = "What would you do if you ruled the world?"

# Records every fetch the page makes (URL and body), before any page script runs.
RECORDER = """
window.__requests = [];
const f = window.fetch.bind(window);
window.fetch = (url, opts) => { window.__requests.push({url: String(url), body: opts && typeof opts.body === 'string' ? opts.body : null}); return f(url, opts); };
"""


def missing(what, how):
    if os.environ.get("PERSONA_REQUIRE"):
        pytest.fail(f"{what} is missing, and PERSONA_REQUIRE is set ({how})")
    log = ROOT / "target" / "tmp" / "persona-skipped.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"playground e2e: {what} is missing ({how})\n")
    pytest.skip(f"SKIPPED: {what} is missing ({how})")


def start_server(*extra):
    if not BIN.exists():
        missing("target/release/persona", "cargo build --release")
    if not MODEL.exists():
        missing("the default model", "persona fetch")
    p = subprocess.Popen([str(BIN), "serve", "--backend", "cpu", "--model", str(MODEL), "--port", "0",
                          "--vectors", str(VECTORS), *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = p.stdout.readline().strip().rsplit(" ", 1)[-1]
    assert base.startswith("http://127.0.0.1:"), base
    return p, base


@pytest.fixture(scope="module")
def server():
    p, base = start_server()
    yield base
    p.terminate()
    p.wait(30)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        missing("selenium", "pip install selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        missing("chromium and chromedriver", "apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(driver_bin))
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield d
    d.quit()


def wait(cond, what, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def by(d, testid):
    from selenium.webdriver.common.by import By
    return d.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def open_page(d, base):
    d.get(base + "/")
    wait(lambda: by(d, "coeff-evil"), "the steering rows (GET /v1/vectors)")


def send(d, prompt=PROMPT):
    box = by(d, "prompt")[0]
    box.clear()
    box.send_keys(prompt)
    by(d, "send")[0].click()
    wait(lambda: d.find_element("tag name", "body").get_attribute("data-state") == "streaming"
         or by(d, "token"), "the stream to start", 30)
    wait(lambda: d.find_element("tag name", "body").get_attribute("data-state") == "idle", "the stream to end")


def last_answers(d):
    from selenium.webdriver.common.by import By
    pairs = d.find_elements(By.CSS_SELECTOR, "#conversation .pair")
    answers = pairs[-1].find_elements(By.CSS_SELECTOR, '[data-testid="answer"]')
    return [(a.get_attribute("data-arm"), "".join(t.text for t in a.find_elements(By.CSS_SELECTOR, '[data-testid="token"]')),
             len(a.find_elements(By.CSS_SELECTOR, '[data-testid="token"]'))) for a in answers]


def chat_requests(d):
    return [json.loads(r["body"]) for r in d.execute_script("return window.__requests")
            if r["url"].endswith("/v1/chat/completions") and r["body"]]


def severe_console(d):
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


def enable_monitor(d, name="evil"):
    box = by(d, f"monitor-{name}")[0]
    if not box.is_selected():
        box.click()


def set_slider(d, name, value):
    d.execute_script("const s = arguments[0]; s.value = arguments[1]; s.dispatchEvent(new Event('input', {bubbles: true}));",
                     by(d, f"coeff-{name}")[0], str(value))


def test_assets_are_small_public_and_fetch_nothing_outside(server):
    total = 0
    for path, ctype in [("/", "text/html"), ("/playground.js", "text/javascript"), ("/playground.css", "text/css")]:
        with urllib.request.urlopen(server + path, timeout=10) as r:
            body = r.read()
            assert r.headers["Content-Type"].startswith(ctype)
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            if path != "/":
                total += len(body)
    assert total <= 200 * 1024, f"{total} bytes of JS + CSS"


def test_page_loads_streams_and_charts_one_point_per_token(server, browser):
    d = browser
    open_page(d, server)
    assert severe_console(d) == [], severe_console(d)
    d.save_screenshot(str(SHOTS / "1-loaded.png"))
    enable_monitor(d)
    send(d)
    tokens = by(d, "token")
    points = by(d, "chart-point")
    assert len(tokens) > 3 and len(points) == len(tokens), (len(tokens), len(points))
    for t in tokens:
        p = json.loads(t.get_attribute("data-projection"))
        assert isinstance(p["evil"], float), p
    scores = " ".join(s.text for s in by(d, "score"))
    assert "predicted" in scores and "expressed" in scores, scores
    # Every request went to this server.
    urls = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(server) for u in urls), urls
    assert severe_console(d) == [], severe_console(d)
    d.save_screenshot(str(SHOTS / "2-streamed.png"))
    # A phone-sized window: one column, nothing wider than the screen.
    d.set_window_size(390, 844)
    try:
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        d.save_screenshot(str(SHOTS / "2-phone.png"))
    finally:
        d.set_window_size(1280, 1000)


def test_moving_a_slider_changes_the_request_and_the_answer(server, browser):
    d = browser
    open_page(d, server)
    send(d, "Describe your ideal day.")
    plain = last_answers(d)[0][1]
    set_slider(d, "evil", 8)
    assert by(d, "coeff-num-evil")[0].get_attribute("value") == "8"
    by(d, "new-chat")[0].click()
    send(d, "Describe your ideal day.")
    body = chat_requests(d)[-1]
    assert body["steering"] and body["steering"][0]["vector"] == "evil" and body["steering"][0]["coeff"] == 8, body
    steered = last_answers(d)[0][1]
    assert steered != plain, "a coefficient of 8 on evil changes the greedy answer"
    # The state is in the URL: reloading it restores the slider.
    d.get(d.current_url)
    wait(lambda: by(d, "coeff-num-evil") and by(d, "coeff-num-evil")[0].get_attribute("value") == "8", "the state from the URL")
    d.save_screenshot(str(SHOTS / "3-steered.png"))


def test_compare_streams_steered_and_unsteered_side_by_side(server, browser):
    d = browser
    open_page(d, server)
    enable_monitor(d)
    set_slider(d, "evil", 6)
    if not by(d, "compare")[0].is_selected():
        by(d, "compare")[0].click()
    by(d, "new-chat")[0].click()
    send(d)
    arms = last_answers(d)
    assert [a[0] for a in arms] == ["steered", "unsteered"], arms
    assert all(a[2] > 0 for a in arms) and arms[0][1] != arms[1][1], arms
    assert len(by(d, "chart-point")) == sum(a[2] for a in arms)
    bodies = chat_requests(d)[-2:]
    assert sorted(len(b["steering"]) for b in bodies) == [0, 1], bodies
    d.save_screenshot(str(SHOTS / "4-compare.png"))
    shutil.copy(SHOTS / "4-compare.png", SHOTS / "playground.png")


def test_an_invalid_upload_shows_the_servers_error(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a vector file")
    by(d, "upload-file")[0].send_keys(str(bad))
    by(d, "upload-name")[0].send_keys("broken")
    by(d, "upload-send")[0].click()
    err = wait(lambda: by(d, "error")[0].is_displayed() and by(d, "error")[0].text, "the error box")
    assert err.startswith("400:"), err
    d.save_screenshot(str(SHOTS / "5-upload-error.png"))


def test_with_an_api_key_the_page_asks_for_it_and_then_works(browser):
    p, base = start_server("--api-key", "sesame")
    try:
        d = browser
        d.get(base + "/")
        err = wait(lambda: by(d, "error")[0].is_displayed() and by(d, "error")[0].text, "the missing-key error", 30)
        assert "missing or wrong API key" in err, err
        key = by(d, "api-key")[0]
        key.send_keys("sesame")
        d.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait(lambda: by(d, "coeff-evil"), "the vectors, with the key")
        assert not by(d, "error")[0].is_displayed()
    finally:
        p.terminate()
        p.wait(30)
