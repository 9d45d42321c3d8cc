"""The chat page (clients/web, served by the nodes) in a real browser: headless Chromium driven by
Playwright, one person's phone and laptop as two browser contexts, through nginx to two real nodes.

Which node each device lands on is made deterministic by nginx's `least_conn`: the phone connects
first, and once its conversation list has loaded (the page opens its socket before any REST call,
and asks for no favicon) its socket is the only connection nginx holds, so the laptop's upgrade goes
to the other node. The tests assert the two nodes differ rather than trust it.

    stream  the phone types; both pages show the same answer, and both saw it grow token by token;
            a new conversation from the laptop lands in both lists
    ask     the agent's question (human in the loop) shows on both; answered inline on the laptop,
            it leaves the phone too, and the answer goes on
    stop    Stop on the laptop ends the phone's answer too, at the same text (cancelled on both)
    kill    the laptop's node is SIGKILLed mid-answer; the laptop page reconnects by itself, to the
            phone's node, and shows the complete answer
    devices each page lists both devices online (presence: `hello.devices` and `presence` frames)

The answers come from the fake LLM ("[[tokens:N]] [[slow:S]]": N words, one every S seconds), long
enough to act mid-answer. Screenshots of both pages go to the test's tmp dir, and both side by side
to docs/img/chat-page.png (the README's) when that file is missing or CHORUS_UPDATE_SCREENSHOTS=1.
Plain HTTP tests cover the page's routes and the dev login, which a node refuses (404) unless
DEV_LOGIN is on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import REPO_ROOT
from tests.fake_llm import FakeLLM
from tests.support import in_rotation, unique

playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed (test extras)")
Browser, Page, expect = playwright.Browser, playwright.Page, playwright.expect

CHROMIUM = Path(os.environ.get("CHORUS_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = REPO_ROOT / "docs" / "img" / "chat-page.png"
JS_DIR = REPO_ROOT / "clients" / "js"
NODE_IDS = ("node-a", "node-b")
WAIT_MS = 30_000  # the bound on any one wait in a page (an answer's end, a reconnect)
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
LAPTOP = {"viewport": {"width": 1280, "height": 800}}

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

# Runs in every page before its own scripts: records each answer's (status, text length) and each
# connection state as they change, so a test can tell afterwards that a page saw an answer grow
# token by token, or went through "reconnecting", without racing the page while it happens.
RECORDER = """
window.__seen = { answers: {}, connection: [] };
new MutationObserver(() => {
  for (const answer of document.querySelectorAll('[data-testid=message][data-role=assistant]')) {
    const states = (window.__seen.answers[answer.dataset.run] ??= []);
    const state = `${answer.dataset.status}:${answer.querySelector('.text').textContent.length}`;
    if (states.at(-1) !== state) states.push(state);
  }
  const connection = document.querySelector('[data-testid=connection]');
  const states = window.__seen.connection;
  if (connection && states.at(-1) !== connection.textContent) states.push(connection.textContent);
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


def words(count: int) -> str:
    return " ".join(f"word{i}" for i in range(1, count + 1))


def ask(count: int, delay_s: float) -> str:
    return f"Tell me a story [[tokens:{count}]] [[slow:{delay_s}]]"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """A cluster of the module's own: one test kills a node, and node choice relies on no one else
    holding sockets."""
    config = ClusterConfig(nodes=2, workers=1, nginx=True,
                           env={"LLM_BASE_URL": fake_llm.base_url, "LLM_API_KEY": "test-key",
                                "AGENT_ASK_USER": "true"})
    with LocalCluster(tmp_path_factory.mktemp("chat-page"), config) as running:
        assert running.nginx is not None, "nginx must be installed for these tests"
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def cluster(fleet: LocalCluster, http: aiohttp.ClientSession) -> AsyncIterator[LocalCluster]:
    """The fleet with both nodes up and in nginx's rotation; afterwards, a killed node restarted."""
    async with in_rotation(fleet, http) as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright.async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            await launched.close()


class Device:
    """One device's page, the uncaught errors of its scripts, and every URL it asked a server for."""

    def __init__(self, name: str, page: Any) -> None:
        self.name, self.page = name, page
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda socket: self.urls.append(socket.url))
        self.connection = page.get_by_test_id("connection")
        self.answers = page.locator("[data-testid=message][data-role=assistant]")

    async def node(self) -> str:
        await expect(self.connection).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await expect(self.connection).to_contain_text(re.compile(r"connected to node-[ab]"))
        return str(await self.connection.get_attribute("data-node"))

    async def send(self, text: str) -> None:
        await self.page.get_by_test_id("composer").fill(text)
        await self.page.get_by_test_id("send").click()

    async def open_conversation(self) -> None:
        """Open the newest conversation in the list (on a phone the list slides in from the menu)."""
        if await self.page.locator(".menu").is_visible():
            await self.page.locator(".menu").click()
        await self.page.get_by_test_id("conversation").first.click()

    def answer(self, run: str) -> Any:
        return self.answers.and_(self.page.locator(f"[data-run='{run}']"))

    async def text(self, run: str) -> str:
        return str(await self.answer(run).locator(".text").text_content())

    async def seen(self) -> dict[str, Any]:
        seen: dict[str, Any] = await self.page.evaluate("window.__seen")
        return seen

    async def screenshot(self, directory: Path) -> Path:
        path = directory / f"{self.name}.png"
        await self.page.screenshot(path=str(path))
        return path


async def open_device(browser: Any, url: str, name: str, options: dict[str, Any]) -> Device:
    context = await browser.new_context(**options)
    # The page keeps its device id in sessionStorage (per tab); name it, so presence reads "phone" and "laptop".
    await context.add_init_script(f"sessionStorage.setItem('chorus.device', {json.dumps(name)});")
    await context.add_init_script(RECORDER)
    device = Device(name, await context.new_page())
    await device.page.goto(url)
    return device


async def phone_and_laptop(cluster: LocalCluster, browser: Any) -> tuple[Device, Device]:
    """One user's phone (signed in with the dev login) and laptop (a token in the URL fragment),
    each on its own node."""
    user = unique("page")
    phone = await open_device(browser, f"{cluster.http_url}/", "phone", PHONE)
    await phone.page.get_by_label("User name").fill(user)
    async with phone.page.expect_response(re.compile(r"/v1/conversations$")) as listed:
        await phone.page.get_by_role("button", name="Sign in").click()
    assert (await listed.value).ok
    phone_node = await phone.node()

    token = cluster.token(user)
    laptop = await open_device(browser, f"{cluster.http_url}/#token={token}", "laptop", LAPTOP)
    laptop_node = await laptop.node()
    assert laptop_node != phone_node, "least_conn puts the second socket on the other node"
    assert "token" not in laptop.page.url, "the token is taken out of the address bar"
    assert not [url for url in laptop.urls if token in url], "and is in no URL the page asked for"
    assert any(url.endswith("/ws?device=laptop&auth=frame") for url in laptop.urls), laptop.urls
    for device in (phone, laptop):
        await expect(device.page.locator(".user")).to_have_text(user)
    return phone, laptop


async def new_run(device: Device, text: str) -> str:
    """Send `text` from `device` and return the id of the run answering it."""
    before = set(await device.answers.evaluate_all("els => els.map(e => e.dataset.run)"))
    await device.send(text)
    await expect(device.answers).to_have_count(len(before) + 1, timeout=WAIT_MS)
    runs = await device.answers.evaluate_all("els => els.map(e => e.dataset.run)")
    (run,) = set(runs) - before
    return str(run)


def grew(states: list[str], final: str) -> bool:
    """Did the page show the answer streaming, at several lengths short of the whole?"""
    partial = {int(s.split(":")[1]) for s in states if s.startswith("streaming:")} - {0, len(final)}
    return len(partial) >= 3


async def keep_screenshot(browser: Any, phone: Path, laptop: Path) -> None:
    """The README's picture, the laptop and the phone side by side: written once, then only on request."""
    if SCREENSHOT.exists() and os.environ.get("CHORUS_UPDATE_SCREENSHOTS") != "1":
        return
    shots = "".join(f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                    for p in (laptop, phone))
    page = await browser.new_page(viewport={"width": 1760, "height": 900})
    await page.set_content(
        "<body style='margin:0;padding:24px;display:flex;gap:24px;align-items:flex-start;background:#dfe3ea'>"
        f"<style>img {{border-radius:10px;box-shadow:0 4px 18px rgb(0 0 0 / .18)}}</style>{shots}</body>")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    await page.locator("body").screenshot(path=str(SCREENSHOT))
    await page.close()


async def test_both_devices_stream_the_same_answer(cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    phone, laptop = await phone_and_laptop(cluster, browser)
    run = await new_run(phone, ask(60, 0.05))
    await laptop.open_conversation()
    for device in (phone, laptop):
        await expect(device.answer(run)).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    assert await phone.text(run) == await laptop.text(run) == words(60)
    for device in (phone, laptop):
        assert grew((await device.seen())["answers"][run], words(60)), (device.name, await device.seen())
    # The question shows on the laptop as the phone's.
    question = laptop.page.locator("[data-testid=message][data-role=user]")
    await expect(question).to_have_count(1)
    await expect(question).to_contain_text("from phone")
    shots = [await device.screenshot(tmp_path) for device in (phone, laptop)]
    await keep_screenshot(browser, *shots)

    # A new conversation from the laptop: the laptop shows only it, both lists have both.
    await laptop.page.get_by_test_id("new-conversation").click()
    await expect(laptop.answers).to_have_count(0)
    second = await new_run(laptop, ask(3, 0.01))
    await expect(laptop.answer(second)).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    assert await laptop.text(second) == words(3)
    await expect(laptop.page.get_by_test_id("message")).to_have_count(2)
    for device in (phone, laptop):
        await expect(device.page.get_by_test_id("conversation")).to_have_count(2, timeout=WAIT_MS)
    assert phone.errors == laptop.errors == []


async def test_a_question_is_answered_inline_and_leaves_every_device(
    cluster: LocalCluster, browser: Any, tmp_path: Path
) -> None:
    phone, laptop = await phone_and_laptop(cluster, browser)
    run = await new_run(phone, '[[tool:ask_user:{"question": "Which city?"}]] plan my trip')
    await laptop.open_conversation()
    for device in (phone, laptop):
        await expect(device.answer(run).locator("form.question")).to_contain_text("Which city?", timeout=WAIT_MS)
    await phone.screenshot(tmp_path)
    await laptop.answer(run).get_by_label("Your answer").fill("Paris")
    await laptop.answer(run).get_by_role("button", name="Answer").click()
    for device in (phone, laptop):
        await expect(device.answer(run)).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
        await expect(device.answer(run).locator("form.question")).to_have_count(0)
        assert "Paris" in await device.text(run)
    assert phone.errors == laptop.errors == []


async def test_stop_on_the_laptop_stops_the_phone_at_the_same_text(
    cluster: LocalCluster, browser: Any, tmp_path: Path
) -> None:
    phone, laptop = await phone_and_laptop(cluster, browser)
    run = await new_run(phone, ask(200, 0.05))
    await laptop.open_conversation()
    await expect(laptop.answer(run).locator(".text")).to_contain_text("word5 ", timeout=WAIT_MS)
    await laptop.page.get_by_test_id("stop").click()
    for device in (phone, laptop):
        await expect(device.answer(run)).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    stopped = await phone.text(run)
    assert stopped == await laptop.text(run)
    assert words(5) in stopped and words(200).startswith(stopped.rstrip()) and len(stopped) < len(words(200))
    await expect(phone.page.get_by_test_id("stop")).to_be_disabled()
    await phone.screenshot(tmp_path)
    await laptop.screenshot(tmp_path)
    assert phone.errors == laptop.errors == []


async def test_the_laptop_resumes_on_the_other_node_when_its_node_dies(
    cluster: LocalCluster, browser: Any, tmp_path: Path
) -> None:
    phone, laptop = await phone_and_laptop(cluster, browser)
    phone_node, laptop_node = await phone.node(), await laptop.node()
    run = await new_run(phone, ask(120, 0.04))
    await laptop.open_conversation()
    await expect(laptop.answer(run).locator(".text")).to_contain_text("word5 ", timeout=WAIT_MS)

    await asyncio.to_thread(cluster.nodes[NODE_IDS.index(laptop_node)].kill)
    assert await laptop.answer(run).get_attribute("data-status") == "streaming", "the kill must land mid-answer"

    await expect(laptop.connection).to_have_text(f"connected to {phone_node} · resumed", timeout=WAIT_MS)
    for device in (phone, laptop):
        await expect(device.answer(run)).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
        assert await device.text(run) == words(120)
    states = (await laptop.seen())["connection"]
    assert any(state.startswith("reconnecting") for state in states), states
    assert (await phone.seen())["connection"][-1] == f"connected to {phone_node}", "the phone was never touched"
    await phone.screenshot(tmp_path)
    await laptop.screenshot(tmp_path)
    assert phone.errors == laptop.errors == []


async def test_each_device_lists_both_devices_online(cluster: LocalCluster, browser: Any) -> None:
    phone, laptop = await phone_and_laptop(cluster, browser)
    nodes = {"phone": await phone.node(), "laptop": await laptop.node()}
    for device in (phone, laptop):
        listed = device.page.get_by_test_id("device")
        await expect(listed).to_have_count(2, timeout=WAIT_MS)
        shown = await listed.evaluate_all("els => els.map(e => [e.dataset.device, e.dataset.node])")
        assert dict(shown) == nodes, (device.name, shown)
        await expect(device.page.locator("[data-testid=device].me")).to_have_attribute("data-device", device.name)


async def test_the_page_and_its_modules_are_served_through_nginx(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{cluster.http_url}/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert '"@chorus/client": "/sdk/index.js"' in page
    assert "script-src 'self' 'sha256-" in policy and "frame-ancestors 'none'" in policy
    for path in ("/app/app.js", "/sdk/index.js", "/sdk/client.js"):
        async with http.get(f"{cluster.http_url}{path}") as response:
            assert (response.status, response.content_type) == (200, "text/javascript"), path
    async with http.get(f"{cluster.http_url}/app/style.css") as response:
        assert (response.status, response.content_type) == (200, "text/css")
    # Only the page's own files, by name: nothing else in those directories, nothing beside them
    # (asked of a node directly: nginx would refuse the climb out itself).
    node = f"http://127.0.0.1:{cluster.node_ports[0]}"
    for path in ("/sdk/protocol.d.ts", "/app/tsconfig.json", "/app/..%2F..%2Fpyproject.toml", "/app/nope.js"):
        async with http.get(URL(f"{node}{path}", encoded=True)) as response:
            assert response.status == 404, path


async def test_the_dev_login_mints_tokens_only_when_on(
    cluster: LocalCluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    user = unique("dev")
    async with http.post(f"{cluster.http_url}/dev/login", json={"user": user}) as response:
        assert response.status == 200
        token = (await response.json())["token"]
    async with http.get(f"{cluster.http_url}/v1/conversations",
                        headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, "the minted token is accepted"
    for bad in ({"user": ""}, {"user": "x" * 65}, {"user": "a\nb"}, {"name": user}, [user]):
        async with http.post(f"{cluster.http_url}/dev/login", json=bad) as response:
            assert response.status == 400, bad

    # The same node with DEV_LOGIN off (the default outside LocalCluster): the route says nothing.
    # It serves the page from WEB_ROOT, as the image does, not from the checkout.
    web_root = tmp_path / "elsewhere"
    shutil.copytree(REPO_ROOT / "clients" / "web", web_root / "web")
    shutil.copytree(REPO_ROOT / "clients" / "js" / "src", web_root / "js" / "src")
    with (web_root / "web" / "index.html").open("a") as page:
        page.write("<!-- from WEB_ROOT -->\n")
    config = ClusterConfig(nodes=1, workers=0, nginx=False, redis_url=cluster.redis_url,
                           database_url=cluster.database_url, jwt_secret=cluster.config.jwt_secret,
                           env={"DEV_LOGIN": "false", "WEB_ROOT": str(web_root)})
    off = LocalCluster(tmp_path, config)
    await asyncio.to_thread(off.start)
    try:
        async with http.post(f"{off.http_url}/dev/login", json={"user": user}) as response:
            assert response.status == 404
        async with http.get(f"{off.http_url}/") as response:
            assert response.status == 200, "the page itself is served either way"
            assert "<!-- from WEB_ROOT -->" in await response.text()
        async with http.get(f"{off.http_url}/sdk/index.js") as response:
            assert response.status == 200
    finally:
        await asyncio.to_thread(off.stop)


def test_the_page_type_checks_against_the_sdk() -> None:
    """tsc --checkJs --strict over clients/web, with `@chorus/client` resolved to clients/js/src."""
    tsc = JS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not tsc.exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300,
                       capture_output=True)
    done = subprocess.run(["node", str(tsc), "-p", str(REPO_ROOT / "clients" / "web" / "tsconfig.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
