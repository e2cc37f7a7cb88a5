"""The search page of `pipeline serve` (pipeline/serve/static/index.html) in a real headless
Chromium driven by selenium, against the real app (`create_app`) on 127.0.0.1 over a small real
index: what a person types and sees, checked against `Searcher` called directly.

Skips, saying why, where selenium, fastapi/uvicorn, chromium or chromedriver are missing
(Debian: `apt-get install chromium chromium-driver`; .ci/run installs them). Screenshots go to
pytest's tmp_path, and also to $PIPELINE_SCREENSHOT_DIR when it is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.search import Searcher

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
pytest.importorskip("fastapi", reason="fastapi is not installed: `pipeline serve` needs it")
pytest.importorskip("uvicorn", reason="uvicorn is not installed: `pipeline serve` needs it")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
if importlib.util.find_spec("pipeline.serve.app") is None:
    pytest.skip("pipeline/serve/app.py (create_app) is not there yet", allow_module_level=True)

from pipeline.serve.app import create_app  # noqa: E402

TINY = ["--model", "random:gpt2-tiny", "--device", "cpu"]
K = 5
WAIT = 30  # seconds: the first query of a fresh server loads nothing more, but CI is slow

# Untrusted text: the page must show it as text, run none of it.
MARKUP_DOC = ('Release notes <script>window.__pwned = "script";</script> say <b>bold</b> '
              '<img src="x" onerror="window.__pwned = \'img\'"> &amp; more')
TOPICS = [
    "a small tool to resize photos and convert images between formats",
    "command line utility to compress files into zip archives",
    "library for parsing JSON documents quickly in C",
    "web server with reverse proxy and load balancing",
    "text editor with syntax highlighting for many languages",
    "fonts for rendering Asian scripts on the desktop",
    "daemon that synchronises the system clock over the network",
    "music player for the terminal with playlists",
    "bread baking timer and recipe scaler for the kitchen",
    "database engine with transactions and SQL queries",
    "tool to resize disk partitions safely",
    "photo gallery generator that writes static HTML pages",
]


def corpus_records() -> list[dict]:
    records = [{"id": f"pkg-{i:02d}", "text": text} for i, text in enumerate(TOPICS)]
    records += [{"id": f"note-{i:02d}", "text": f"{TOPICS[i % len(TOPICS)]}, variant {i}: "
                 f"maintained by team {i % 5} and packaged for release {i % 3}"}
                for i in range(24)]
    records.append({"id": "markup-doc", "text": MARKUP_DOC})
    # Long enough for several 64-token windows, with an unbroken word that must wrap on a phone.
    records.append({"id": "long-" + "x" * 80, "text": "very long description " * 40
                    + "https://example.invalid/" + "a" * 300})
    return records


def cli(*args):
    result = CliRunner().invoke(cli_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_page")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in corpus_records()))
    index = root / "pages"
    cli("tokenize", corpus, "--index", index, "--max-tokens", 64)
    cli("embed", "--index", index, *TINY)
    cli("build-index", "--index", index)
    return index


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(index_dir):
    """The real app in uvicorn on 127.0.0.1, on a free port, in a background thread."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app([index_dir]), log_level="warning", lifespan="auto")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=WAIT)
    sock.close()


def api(base: str, path: str, **params) -> tuple[int, dict]:
    url = f"{base}{path}" + (f"?{urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def index_name(server) -> str:
    status, info = api(server, "/info")
    assert status == 200, info
    return info["default_index"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--disable-default-apps",
                "--disable-features=Translate,MediaRouter,OptimizationHints",
                # Anything not on loopback goes to a dead proxy: the page must need nothing
                # from outside, and the browser reaches nothing outside.
                "--proxy-server=http://127.0.0.1:9",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except WebDriverException as err:
        pytest.skip(f"chromium did not start under chromedriver: {err.msg}")
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The browser at desktop size, on a fresh copy of the page."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(server + "/")
    wait_ready(browser)
    return browser


# --- helpers ---------------------------------------------------------------------------------

def js(driver, code: str, *args):
    return driver.execute_script(code, *args)


def wait_ready(driver):
    WebDriverWait(driver, WAIT).until(lambda d: js(d, "return document.body.dataset.ready"))


def wait_results(driver, query: str):
    """Until the page shows the answer to `query` (or an error)."""
    try:
        WebDriverWait(driver, WAIT).until(lambda d: js(
            d, "return document.body.dataset.state === 'error' || "
               "(document.body.dataset.state === 'done' && "
               " document.getElementById('results').dataset.query === arguments[0])", query))
    except TimeoutException:
        pytest.fail(f"no results for {query!r} after {WAIT}s; alert: "
                    f"{driver.find_element(By.ID, 'error').text!r}")
    assert js(driver, "return document.body.dataset.state") == "done", \
        driver.find_element(By.ID, "error").text


def shown_hits(driver) -> list[dict]:
    """What the page shows for each hit: id, score and snippet, read off the screen."""
    return [{"doc_id": li.find_element(By.CSS_SELECTOR, ".doc-id").text,
             "score": float(li.find_element(By.CSS_SELECTOR, ".score-value").text),
             "text": li.find_element(By.CSS_SELECTOR, ".snippet").text}
            for li in driver.find_elements(By.CSS_SELECTOR, "#results > li.hit")]


def expect_new_answer(driver):
    """Forget the state of the last answer, so that waiting sees the next one."""
    js(driver, "document.body.dataset.state = ''")


def type_query(driver, query: str, k: int | None = None):
    if k is not None:
        box = driver.find_element(By.ID, "k")
        box.clear()
        box.send_keys(str(k))
    box = driver.find_element(By.ID, "q")
    box.clear()
    expect_new_answer(driver)
    box.send_keys(query + Keys.ENTER)
    wait_results(driver, query)


def expected(index_dir: Path, query: str, k: int = K):
    """The independent path: the Searcher itself, in this process."""
    [hits] = Searcher(index_dir).search([query], k)
    return hits


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "no screenshot"
    if os.environ.get("PIPELINE_SCREENSHOT_DIR"):
        out = Path(os.environ["PIPELINE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / name)
    return path


# --- tests -----------------------------------------------------------------------------------

def test_enter_shows_the_searchers_hits_keeps_them_in_the_url_and_a_reload_shows_them_again(
        page, server, index_dir, index_name, tmp_path):
    query = "tool to resize photos"
    type_query(page, query, k=K)
    want = expected(index_dir, query)
    shown = shown_hits(page)
    assert [h["doc_id"] for h in shown] == [h.doc_id for h in want]
    assert shown[0]["doc_id"] == want[0].doc_id
    assert [h["score"] for h in shown] == pytest.approx([h.score for h in want], abs=1e-4)
    assert shown[0]["text"].replace("…", "").strip() in want[0].text
    # The query's words are marked in the snippets (as elements the page made, not markup).
    marks = {m.text.lower() for m in page.find_elements(By.CSS_SELECTOR, "#results mark")}
    assert marks & {"tool", "resize", "photos"}

    params = parse_qs(urlsplit(page.current_url).query)
    assert params["q"] == [query] and params["k"] == [str(K)] and params["index"] == [index_name]
    assert screenshot(page, tmp_path, "search-page.png").stat().st_size > 0

    page.refresh()
    wait_ready(page)
    wait_results(page, query)
    assert shown_hits(page) == shown
    assert page.find_element(By.ID, "q").get_attribute("value") == query
    assert page.find_element(By.ID, "k").get_attribute("value") == str(K)


def test_a_url_with_a_query_runs_the_search(browser, server, index_dir, index_name):
    query = "compress files into archives"
    browser.get(f"{server}/?{urlencode({'q': query, 'k': 3, 'index': index_name})}")
    wait_ready(browser)
    wait_results(browser, query)
    assert [h["doc_id"] for h in shown_hits(browser)] == \
        [h.doc_id for h in expected(index_dir, query, 3)]


def test_document_markup_is_shown_as_text_and_never_run(page, index_dir):
    type_query(page, MARKUP_DOC, k=K)
    assert expected(index_dir, MARKUP_DOC)[0].doc_id == "markup-doc"
    [top, *_] = page.find_elements(By.CSS_SELECTOR, "#results > li.hit")
    assert top.find_element(By.CSS_SELECTOR, ".doc-id").text == "markup-doc"
    text = top.find_element(By.CSS_SELECTOR, ".snippet").text
    assert '<script>window.__pwned = "script";</script>' in text
    assert "<b>bold</b>" in text and '<img src="x"' in text and "&amp;" in text
    assert page.find_elements(By.CSS_SELECTOR, "#results script, #results b, #results img") == []
    assert js(page, "return window.__pwned === undefined")


def test_an_api_error_is_shown_in_the_alert(page, server, index_name):
    # A bookmark of an index this server does not hold: the page asks for it anyway, and the
    # server's own one-line message is what the person sees.
    params = {"q": "bread", "k": K, "index": "no-such-index"}
    status, body = api(server, "/search", **params)
    assert 400 <= status < 600 and isinstance(body.get("error"), str), (status, body)
    page.get(f"{server}/?{urlencode(params)}")
    wait_ready(page)
    WebDriverWait(page, WAIT).until(lambda d: js(d, "return document.body.dataset.state")
                                    == "error")
    alert = page.find_element(By.CSS_SELECTOR, "[role=alert]")
    assert alert.is_displayed() and alert.text == body["error"]
    assert page.find_elements(By.CSS_SELECTOR, "#results > li") == []

    # Choosing an index the server holds searches again, and the alert goes.
    expect_new_answer(page)
    Select(page.find_element(By.ID, "index")).select_by_value(index_name)
    wait_results(page, "bread")
    assert not alert.is_displayed() and alert.text == ""
    assert page.find_elements(By.CSS_SELECTOR, "#results > li.hit")


def test_keyboard_slash_focuses_the_box_tab_reaches_the_results_with_a_visible_focus(page):
    type_query(page, "text editor", k=3)
    js(page, "document.activeElement.blur()")
    ActionChains(page).send_keys("/").perform()
    assert js(page, "return document.activeElement.id") == "q"

    reached = []
    for _ in range(12):
        page.switch_to.active_element.send_keys(Keys.TAB)
        reached.append(js(page, "return document.activeElement.className"))
        if reached[-1] == "hit":
            break
    assert reached[-1] == "hit", f"Tab went through {reached} without reaching a result"
    outline = js(page, "var s = getComputedStyle(document.activeElement);"
                       "return [s.outlineStyle, s.outlineWidth];")
    assert outline[0] != "none" and outline[1] != "0px", outline
    assert page.switch_to.active_element.find_element(By.CSS_SELECTOR, ".doc-id").text


def test_the_download_link_holds_the_hits_shown(page):
    query = "database engine"
    type_query(page, query, k=K)
    link = page.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download").endswith(".json")
    data = page.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('download').href).then(r => r.json()).then(done,"
        " e => done({error: String(e)}));")
    assert data.get("query") == query
    assert [h["doc_id"] for h in data["hits"]] == [h["doc_id"] for h in shown_hits(page)]


def test_a_phone_width_needs_no_horizontal_scroll(browser, server, index_dir, tmp_path):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2,
                             "mobile": True})
    try:
        # The long document: a long id, many windows and a 300-letter word must all wrap.
        # Every document is shown (k = their number), the long one among them.
        query, k = "very long description", len(corpus_records())
        browser.get(f"{server}/?{urlencode({'q': query, 'k': k})}")
        wait_ready(browser)
        wait_results(browser, query)
        assert any(h["doc_id"].startswith("long-") for h in shown_hits(browser))
        assert js(browser, "return window.innerWidth") == 390
        width = js(browser, "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"scrollWidth {width[0]} > innerWidth {width[1]}"
        screenshot(browser, tmp_path, "search-page-390px.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_page_loads_nothing_but_its_own_server(page, server):
    type_query(page, "fonts", k=3)
    urls = js(page, "return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in urls if not u.startswith(server + "/")]
    assert outside == [] and any("/search?" in u for u in urls), urls
