// Chat: a conversation streamed token by token, with a stop button, a system prompt and
// the sampling settings.

import { $, el, numberOrUndefined, status } from "./dom.js";
import { describeUsage, streamCompletion } from "./stream.js";

const panel = $("#chat");
const messages = [];
let controller = null;

function bubble(role, text) {
  const node = el("div", { class: `message ${role}` }, el("b", {}, role), el("span", {}, text));
  $(".transcript", panel).append(node);
  return $("span", node);
}

function settings() {
  return {
    model: $("[name=model]", panel).value,
    temperature: numberOrUndefined($("[name=temperature]", panel)),
    top_p: numberOrUndefined($("[name=top_p]", panel)),
    max_tokens: numberOrUndefined($("[name=max_tokens]", panel)),
    stream_options: { include_usage: true },
  };
}

async function send() {
  const input = $("[name=prompt]", panel);
  if (!input.value.trim() || controller) return;
  messages.push({ role: "user", content: input.value });
  bubble("user", input.value);
  input.value = "";
  const system = $("[name=system]", panel).value.trim();
  const history = system ? [{ role: "system", content: system }, ...messages] : messages;
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  controller = new AbortController();
  $("[name=stop]", panel).disabled = false;
  status(panel, "streaming…");
  let text = "";
  try {
    const result = await streamCompletion("/v1/chat/completions",
      { ...settings(), messages: history },
      { onText: (sofar) => { text = sofar; reply.textContent = sofar; }, signal: controller.signal });
    status(panel, describeUsage(result), "ok");
  } catch (err) {
    if (err.name === "AbortError") status(panel, "stopped");
    else status(panel, err.message, "error");
  } finally {
    reply.classList.remove("streaming");
    if (text) messages.push({ role: "assistant", content: text });
    controller = null;
    $("[name=stop]", panel).disabled = true;
  }
}

export function init() {
  $("[name=send]", panel).addEventListener("click", send);
  $("[name=prompt]", panel).addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      send();
    }
  });
  $("[name=stop]", panel).addEventListener("click", () => controller?.abort());
  $("[name=clear]", panel).addEventListener("click", () => {
    messages.length = 0;
    $(".transcript", panel).replaceChildren();
    status(panel, "");
  });
}
