"""Claude Code, Anthropic's coding-agent CLI (npm `@anthropic-ai/claude-code`), in headless
mode (`claude -p`) against k2serve's Messages API: a task round-trips a tool call. The model
asks for the Write tool, the CLI writes the file and sends the tool's result back, the model
answers, and the CLI prints that answer.

The model is a tiny K2 taught, in this run, to answer the two requests this CLI version sends
for the task, so the test follows the CLI as it changes. Those requests are captured first from
the CLI itself, by a loopback server that plays the model's part once (the tool call), then
refuses the second request. The CLI is the one K2SERVE_TEST_CLAUDE_CODE names
(scripts/install-claude-code installs it); without it the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.conftest import K2_ID, start_server, stop_server

TASK = "Create a file hello.txt containing hi."
SYSTEM = "You are a coding agent: do the task with your tools, then say Done."
ANSWER = "Done."


def claude_code() -> str:
    path = os.environ.get("K2SERVE_TEST_CLAUDE_CODE")
    if not path:
        pytest.skip("K2SERVE_TEST_CLAUDE_CODE is not set (scripts/install-claude-code)")
    return path


def run_claude(claude: str, base_url: str, workdir, home) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), ANTHROPIC_BASE_URL=base_url,
               ANTHROPIC_API_KEY="local", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1")
    return subprocess.run([claude, "-p", TASK, "--model", K2_ID, "--tools", "Write",
                           "--allowedTools", "Write", "--system-prompt", SYSTEM],
                          env=env, cwd=workdir, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


class CapturingModel(BaseHTTPRequestHandler):
    """Plays the model once: the first request gets a Write call (as Anthropic's stream);
    every later one a 400. Keeps each request's body."""

    protocol_version = "HTTP/1.1"
    bodies: list[dict]
    call: dict

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        if len(self.bodies) == 1:
            self._reply(200, "text/event-stream", self._tool_call_events())
        else:
            self._reply(400, "application/json", json.dumps({"type": "error", "error": {
                "type": "invalid_request_error", "message": "captured"}}).encode())

    def _tool_call_events(self) -> bytes:
        events = [
            ("message_start", {"message": {
                "id": "msg_0", "type": "message", "role": "assistant", "model": K2_ID,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 0}}}),
            ("content_block_start", {"index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_0", "name": "Write", "input": {}}}),
            ("content_block_delta", {"index": 0, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(self.call)}}),
            ("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                               "usage": {"output_tokens": 1}}),
            ("message_stop", {}),
        ]
        return b"".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
                        for name, data in events)

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def capture_requests(claude: str, workdir, home, call: dict) -> list[dict]:
    handler = type("Handler", (CapturingModel,), {"bodies": [], "call": call})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_claude(claude, f"http://127.0.0.1:{server.server_port}", workdir, home)
    finally:
        server.shutdown()
        server.server_close()
    return handler.bodies


def teach_k2(directory, bodies: list[dict], call: dict):
    """A tiny K2 that answers the task with the Write call and the tool's result with ANSWER:
    the prompts rendered exactly as the Messages route renders them."""
    from k2serve.api.anthropic_messages import messages_to_chat
    from k2serve.api.prompts import chat_prompt
    from k2serve.api.tools import plan_tools
    from k2serve.serving.text_model import TextModel
    from tests.k2_trained import train_k2

    def prompts(tokenizer, template):
        model = TextModel(tokenizer, context_length=4096, chat_template=template)
        out = []
        for body in bodies:
            req = messages_to_chat(body, model.reasoning)
            out.append(chat_prompt(req, model, plan_tools(req, model))[1])
        return out

    call_text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.Write:0"
                 f"<|tool_call_argument_begin|>{json.dumps(call)}<|tool_call_end|>"
                 "<|tool_calls_section_end|>")
    return train_k2(directory, prompts, [call_text, ANSWER], steps=250, lr=1e-2)


def test_claude_code_round_trips_a_tool_call(tmp_path):
    claude = claude_code()
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    target = workdir / "hello.txt"
    call = {"file_path": str(target), "content": "hi"}

    bodies = capture_requests(claude, workdir, home, call)
    assert len(bodies) == 2, bodies  # the task, then the task with the call and its result
    assert target.read_text() == "hi"  # the CLI ran the played call
    result = bodies[1]["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and not result.get("is_error"), result
    target.unlink()

    checkpoint = teach_k2(tmp_path / "k2", bodies, call)
    server = start_server("--model", str(checkpoint), "--served-model-name", K2_ID)
    try:
        done = run_claude(claude, server.root, workdir, home)
    finally:
        stop_server(server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert target.read_text() == "hi"  # the model's call, run by the CLI
    assert done.stdout.strip() == ANSWER  # the model's answer to the tool's result
