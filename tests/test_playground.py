"""The playground page (GET /, GET /playground) in a real headless Chromium against the live janus-tiny server.

The browser is Debian's `chromium` (/usr/bin/chromium) driven by the `playwright` package; Playwright's own
browser downloads are never used. Without either, the browser tests skip and say why. Every request the page
makes is routed through a guard that lets only the server under test through: anything else fails the test.

Screenshots of both tabs go to pytest's temporary folder on every run (see the path in the -ra summary's
log: `playground screenshots`), and to docs/playground-*.png (shown by the README) when those are missing or
when JANUS_UPDATE_SCREENSHOTS=1.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from conftest import API_KEY, GENERATE_PROMPT, LiveServer, png_bytes

try:
    from playwright.sync_api import BrowserContext, Page, Route, expect, sync_playwright
except ImportError:  # the test extra is not installed
    sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "server" / "static"
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 940, "height": 760}
TIMEOUT_MS = 120_000
QUESTION = "What is in this picture?"
IMAGE_STEPS = 576


# ---- the page over plain HTTP: no browser needed ----


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_page_is_served_without_the_api_key(server: LiveServer, path: str):
    with server.client(api_key=None) as http:
        page = http.get(path)
        assert page.status_code == 200, page.text[:300]
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert 'id="tab-understand"' in page.text and 'id="tab-generate"' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        for asset, media_type in [("/playground/playground.js", "text/javascript"),
                                  ("/playground/playground.css", "text/css")]:
            response = http.get(asset)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(media_type)
            assert response.headers["x-content-type-options"] == "nosniff"
        # the model routes the page calls still need the key
        assert http.post("/generate", json={"prompt": "x"}).status_code == 401


def test_the_page_names_no_other_origin():
    """Every src/href/url() of the page, its script and its styles is same-origin or a data: URL."""
    for name in ("playground.html", "playground.css", "playground.js"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://localhost", "")), name
        for url in re.findall(r'(?:src|href)="([^"]*)"', text) + re.findall(r"url\(([^)]*)\)", text):
            assert url.startswith(("/", "#", "data:")), f"{name}: {url}"
        assert "@import" not in text and "@font-face" not in text


def test_the_page_is_not_in_the_openapi_schema(server: LiveServer):
    with server.client(api_key=None) as http:
        paths = http.get("/openapi.json").json()["paths"]
    assert not {"/", "/playground", "/playground/playground.js", "/playground/playground.css"} & set(paths)


def test_the_static_files_are_package_data():
    """`pip install .` (the Docker image) installs server/static/ with the code, as pyproject declares it."""
    from server.routes_playground import ASSETS

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch("server", pattern) for pattern in config["packages"]["find"]["include"])
    patterns = config["package-data"]["server"]
    files = sorted(path.name for path in STATIC.iterdir() if path.is_file())
    assert files == sorted(ASSETS)
    for name in files:
        assert any(fnmatch(f"static/{name}", pattern) for pattern in patterns), f"{name} is not package data"


# ---- the browser ----


class NetworkGuard:
    """Routes every request of the browser context: the allowed origins go through, any other is aborted
    and remembered; data: and blob: URLs never leave the page."""

    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.blocked: list[str] = []
        self.seen: list[str] = []

    def allow(self, base_url: str) -> None:
        self.allowed.add(urlsplit(base_url).netloc)

    def handle(self, route: Route) -> None:
        url = route.request.url
        self.seen.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or (parts.scheme == "http" and parts.netloc in self.allowed):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrowserContext, NetworkGuard]]:
    if sync_playwright is None:
        pytest.skip("the playwright package is not installed: pip install -c constraints.txt -e '.[test]'")
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium: apt-get install -y chromium")
    guard = NetworkGuard()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            accept_downloads=False,
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.route("**/*", guard.handle)
        try:
            yield context, guard
        finally:
            context.close()


@pytest.fixture
def guard(browser: tuple[BrowserContext, NetworkGuard]) -> NetworkGuard:
    return browser[1]


@pytest.fixture
def page(browser: tuple[BrowserContext, NetworkGuard], server: LiveServer) -> Iterator[Page]:
    """A new tab (so a fresh sessionStorage); at the end, no request left for another origin and no
    uncaught script error happened."""
    context, guard = browser
    guard.allow(server.base_url)
    guard.blocked.clear()
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    yield tab
    tab.close()
    assert not guard.blocked, f"the page tried to reach other origins: {guard.blocked}"
    assert not script_errors, script_errors


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("playground-screenshots")
    print(f"playground screenshots: {folder}")
    return folder


def keep_screenshot(page: Page, folder: Path, name: str) -> None:
    """A small PNG of the page: in pytest's temporary folder always, in docs/ if missing or asked for."""
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    small = shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    targets = [folder / name]
    if os.environ.get("JANUS_UPDATE_SCREENSHOTS") == "1" or not (DOCS / name).exists():
        DOCS.mkdir(exist_ok=True)
        targets.append(DOCS / name)
    for target in targets:
        small.save(target, optimize=True)


def open_playground(page: Page, live: LiveServer, tab: str, api_key: str | None = API_KEY) -> None:
    page.goto(f"{live.base_url}/#{tab}")
    expect(page.get_by_role("tab", name="Understanding" if tab == "understand" else "Generation")).to_have_attribute(
        "aria-selected", "true")
    expect(page.locator("#model-line")).to_contain_text("janus-tiny")
    if api_key is not None:
        page.get_by_label("API key").fill(api_key)


def record(page: Page, selector: str, expression: str, name: str) -> None:
    """Record `expression` (of `el`, the element) into window[name] at every change under `selector`."""
    page.evaluate(f"""() => {{
        const el = document.querySelector({json.dumps(selector)});
        const read = (el) => {expression};
        window[{json.dumps(name)}] = [];
        new MutationObserver(() => window[{json.dumps(name)}].push(read(el)))
            .observe(el, {{attributes: true, childList: true, subtree: true, characterData: true}});
    }}""")


def drop_file(page: Page, selector: str, name: str, data: bytes) -> None:
    """Drop a file onto `selector` as a user dragging it from the desktop would."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode()],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def error_text(page: Page, box: str) -> str:
    locator = page.get_by_test_id(box)
    expect(locator).to_be_visible()
    return locator.inner_text()


def pixels(b64_png: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64_png)))
    assert image.size == (384, 384)
    return np.asarray(image.convert("RGB"))


def test_understanding_streams_the_apis_greedy_answer(page: Page, server: LiveServer, golden_png: bytes,
                                                      screenshots: Path):
    """One image picked, one dropped, a question: the streamed answer is the API's own (greedy) answer."""
    red = png_bytes()
    with server.client() as http:
        expected = http.post("/understand", files=[("image", ("red.png", red, "image/png")),
                                                   ("image", ("photo.png", golden_png, "image/png"))],
                             data={"question": QUESTION, "max_new_tokens": "24", "temperature": "0"})
    assert expected.status_code == 200, expected.text[:300]

    open_playground(page, server, "understand")
    page.get_by_label("Drop images here").set_input_files([{"name": "red.png", "mimeType": "image/png", "buffer": red}])
    drop_file(page, "#drop-zone", "photo.png", golden_png)
    expect(page.get_by_test_id("thumb")).to_have_count(2)
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_label("Max new tokens").fill("24")
    record(page, "#answer", "el.textContent", "answers")
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_test_id("understand-stats")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)

    answer = expected.json()
    assert page.get_by_test_id("answer").text_content() == answer["text"]
    assert page.get_by_test_id("understand-error").is_hidden()
    stats = page.get_by_test_id("understand-stats").inner_text()
    assert f"finish_reason: {answer['finish_reason']}" in stats
    assert f"{answer['usage']['completion_tokens']} new" in stats
    pieces = page.evaluate("window.answers")
    assert len([piece for piece in pieces if piece]) > 1, "the answer did not stream in pieces"
    assert all(answer["text"].startswith(piece) for piece in pieces)
    keep_screenshot(page, screenshots, "playground-understand.png")


def test_generation_shows_progress_then_the_images_with_seeds_and_downloads(
        page: Page, server: LiveServer, generated: dict[str, Any], screenshots: Path):
    """n=2, seed 42, no previews: the bar goes up to the end, then two images equal to the API's
    (`generated`: the same prompt, n and seed, the page's default cfg_weight 5 and temperature 1)."""
    open_playground(page, server, "generate")
    page.get_by_label("Prompt").fill(GENERATE_PROMPT)
    page.get_by_label("Images (n)").fill("2")
    page.get_by_label("Seed").fill("42")
    page.get_by_label("Previews").uncheck()
    record(page, "#generate-progress", "[Date.now(), el.value, el.max]", "progress")
    started = time.monotonic()
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("image-slot")).to_have_count(2)
    final = page.locator('[data-testid="image-slot"][data-state="final"]')
    expect(final).to_have_count(2, timeout=TIMEOUT_MS)
    seconds = time.monotonic() - started
    expect(page.get_by_test_id("generate-stats")).to_contain_text("2 images")

    progress = page.evaluate("window.progress")
    values = [value for _, value, _ in progress]
    assert all(total == IMAGE_STEPS for _, _, total in progress)
    assert values == sorted(values), values
    assert values[-1] == IMAGE_STEPS
    assert len({value for value in values if 0 < value < IMAGE_STEPS}) >= 3, f"{values} in {seconds:.1f} s"
    assert page.get_by_test_id("generate-progress-text").inner_text() == f"{IMAGE_STEPS} / {IMAGE_STEPS}"

    expect(page.get_by_label("every")).to_be_disabled()
    for index, image in enumerate(generated["images"]):
        slot = final.nth(index)
        assert slot.get_by_test_id("image-seed").inner_text() == f"seed {image['seed']}"
        link = slot.get_by_test_id("image-download")
        assert link.get_attribute("download") == f"janus-{image['seed']}.png"
        href = link.get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        assert np.array_equal(pixels(href.removeprefix("data:image/png;base64,")), pixels(image["b64_json"]))
        assert slot.locator("img").get_attribute("src") == href
        assert slot.locator("img").evaluate("img => img.complete && img.naturalWidth") == 384
    assert [image["seed"] for image in generated["images"]] == [42, 43]
    keep_screenshot(page, screenshots, "playground-generate.png")


def test_generation_previews_appear_before_the_image(page: Page, server: LiveServer):
    """Previews on (every 48 steps, the page's default): each slot shows 24x24 previews, then the image."""
    open_playground(page, server, "generate")
    expect(page.get_by_label("Previews")).to_be_checked()
    expect(page.get_by_label("every")).to_have_value("48")
    page.get_by_label("Prompt").fill(GENERATE_PROMPT)
    page.get_by_label("Seed").fill("7")
    record(page, "#gallery", "Array.from(el.querySelectorAll('img'), "
                             "(img) => [img.dataset.state, img.naturalWidth, img.src.length])", "slots")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator('[data-testid="image-slot"][data-state="final"]')).to_have_count(1, timeout=TIMEOUT_MS)
    # the image element's size is known once it has decoded: wait for the last preview to have loaded
    states = [state for snapshot in page.evaluate("window.slots") for state in snapshot]
    previews = [state for state in states if state[0] == "preview"]
    assert previews, f"no preview was shown: {states[:5]}"
    assert {width for _, width, _ in previews} <= {0, 24}
    assert 24 in {width for _, width, _ in previews}
    assert states.index(previews[0]) < max(i for i, state in enumerate(states) if state[0] == "final")
    assert len({length for _, _, length in previews}) > 1, "the previews did not change as tokens came"
    assert page.locator("#gallery img").get_attribute("data-state") == "final"


def test_stop_cancels_a_generation(page: Page, server: LiveServer):
    open_playground(page, server, "generate")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("generate-stats")).to_have_text("Drawing…")
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_test_id("generate-stats")).to_have_text("Stopped.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert page.get_by_test_id("generate-error").is_hidden()
    assert page.locator('[data-testid="image-slot"][data-state="final"]').count() == 0


def test_seeds_past_javascripts_integers_keep_every_digit(page: Page, server: LiveServer):
    """Seeds go up to 2**63 - 1: the page sends and shows them as digits, never through a float.
    The server's answer is made up here (a route of the page), so no image is drawn."""
    sent: list[str] = []
    tiny = base64.b64encode(png_bytes(8, 8)).decode()

    def fake_generate(route: Route) -> None:
        sent.append(route.request.post_data)
        final = {"id": "req-x", "images": [{"b64_json": tiny, "seed": 2**63 - 1}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 576, "total_tokens": 577, "images": 1},
                 "timings": {"queue": 0, "prefill": 0, "decode": 0, "vq_decode": 0, "total": 0}}
        events = [{"id": "req-x", "step": 1, "total": IMAGE_STEPS}, final]
        body = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route(f"{server.base_url}/generate", fake_generate)
    open_playground(page, server, "generate")
    page.get_by_label("Seed").fill(str(2**63 - 2))
    page.get_by_role("button", name="Generate").click()
    slot = page.locator('[data-testid="image-slot"][data-state="final"]')
    expect(slot).to_have_count(1)
    assert f'"seed":{2**63 - 2}' in sent[0]
    assert json.loads(sent[0])["stream"] is True and json.loads(sent[0])["preview_every"] == 48
    assert slot.get_by_test_id("image-seed").inner_text() == f"seed {2**63 - 1}"
    assert slot.get_by_test_id("image-download").get_attribute("download") == f"janus-{2**63 - 1}.png"

    page.get_by_label("Seed").fill("-3")
    page.get_by_role("button", name="Generate").click()
    assert page.get_by_label("Seed").evaluate("el => el.validity.valid") is False
    assert len(sent) == 1, "an invalid seed was sent"


def test_a_wrong_or_missing_api_key_shows_the_401(page: Page, server: LiveServer):
    open_playground(page, server, "understand", api_key="not-the-key")
    page.get_by_label("Drop images here").set_input_files(
        [{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page.get_by_role("button", name="Ask").click()
    shown = error_text(page, "understand-error")
    assert "HTTP 401" in shown and "Invalid API key." in shown and "invalid_api_key" in shown
    assert page.get_by_test_id("answer").text_content() == ""

    page.get_by_role("tab", name="Generation").click()
    page.get_by_role("button", name="Generate").click()
    shown = error_text(page, "generate-error")
    assert "HTTP 401" in shown and "Invalid API key." in shown

    page.get_by_role("button", name="Forget").click()
    assert page.evaluate("sessionStorage.length") == 0
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("generate-error")).to_contain_text("Missing API key")
    expect(page.get_by_test_id("generate-error")).to_contain_text("HTTP 401")


def test_the_api_key_is_kept_in_the_tabs_session_storage(page: Page, server: LiveServer):
    open_playground(page, server, "understand")
    assert page.evaluate("Object.values(sessionStorage)") == [API_KEY]
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(API_KEY)
    assert page.get_by_label("API key").get_attribute("type") == "password"
    requests: list[dict[str, str]] = []
    page.on("request", lambda request: requests.append(request.headers) if "/understand" in request.url else None)
    page.get_by_label("Max new tokens").fill("2")
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_test_id("understand-stats")).to_contain_text("finish_reason")
    assert requests and requests[0]["authorization"] == f"Bearer {API_KEY}"


def test_an_oversize_upload_shows_the_413(page: Page, server: LiveServer):
    """The test server takes bodies up to 1 MB."""
    open_playground(page, server, "understand")
    page.get_by_label("Drop images here").set_input_files(
        [{"name": "huge.png", "mimeType": "image/png", "buffer": os.urandom(1_200_000)}])
    page.get_by_role("button", name="Ask").click()
    shown = error_text(page, "understand-error")
    assert "HTTP 413" in shown and "The request body is over 1000000 bytes." in shown and "body_too_large" in shown


def test_a_validation_error_shows_the_400_and_its_param(page: Page, server: LiveServer):
    open_playground(page, server, "understand")
    page.get_by_label("Max new tokens").fill("1000")
    page.get_by_role("button", name="Ask").click()
    shown = error_text(page, "understand-error")
    assert "HTTP 400" in shown and "over this server's limit of 256" in shown and "param: max_new_tokens" in shown


def test_an_error_in_the_middle_of_the_stream_is_shown(page: Page, guard: NetworkGuard,
                                                       short_timeout_server: LiveServer):
    """The short-timeout server times the generation out after a second, after the first steps."""
    guard.allow(short_timeout_server.base_url)
    open_playground(page, short_timeout_server, "generate")
    page.get_by_role("button", name="Generate").click()
    shown = error_text(page, "generate-error")
    assert "Error during the stream (HTTP 200)" in shown and "code: timeout" in shown
    assert 0 < page.get_by_test_id("generate-progress").evaluate("el => el.value") < IMAGE_STEPS
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_no_request_leaves_for_another_origin(page: Page, guard: NetworkGuard, server: LiveServer):
    """Everything the page loads comes from the server; the guard itself stops a request elsewhere."""
    seen_before = len(guard.seen)
    loaded: list[str] = []
    page.on("request", lambda request: loaded.append(request.url))
    open_playground(page, server, "understand")
    page.wait_for_load_state("networkidle")
    page.get_by_role("tab", name="Understanding").press("ArrowRight")
    expect(page.get_by_role("tab", name="Generation")).to_be_focused()
    expect(page.locator("#panel-generate")).to_be_visible()
    assert page.evaluate("location.hash") == "#generate"
    page.wait_for_load_state("networkidle")
    origin = urlsplit(server.base_url).netloc
    assert loaded and all(urlsplit(url).netloc == origin for url in loaded if not url.startswith("data:")), loaded
    assert {urlsplit(url).path for url in loaded} >= {"/", "/playground/playground.js", "/playground/playground.css",
                                                       "/ready"}
    assert all(urlsplit(url).netloc == origin for url in guard.seen[seen_before:] if not url.startswith("data:"))

    # the page's Content-Security-Policy stops its scripts from reaching another host before the network does
    failed = page.evaluate("fetch('http://192.0.2.1/x').then(() => 'sent', (err) => 'failed')")
    assert failed == "failed"
    assert not guard.blocked
    # and the guard works: a request to another host is stopped and seen
    with pytest.raises(Exception, match="ERR_BLOCKED_BY_CLIENT"):
        page.goto("http://192.0.2.1/x")
    assert guard.blocked == ["http://192.0.2.1/x"]
    guard.blocked.clear()
