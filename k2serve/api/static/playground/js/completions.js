// Completions: a raw prompt continued, streamed.

import { $, numberOrUndefined, status } from "./dom.js";
import { describeUsage, streamCompletion } from "./stream.js";

const panel = $("#completions");

async function run() {
  const output = $(".output", panel);
  output.textContent = "";
  status(panel, "streaming…");
  try {
    const result = await streamCompletion("/v1/completions", {
      model: $("[name=model]", panel).value,
      prompt: $("[name=prompt]", panel).value,
      max_tokens: numberOrUndefined($("[name=max_tokens]", panel)),
      temperature: numberOrUndefined($("[name=temperature]", panel)),
      stream_options: { include_usage: true },
    }, { onText: (text) => { output.textContent = text; } });
    status(panel, describeUsage(result), "ok");
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", run);
}
