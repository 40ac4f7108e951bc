// Structured output: a JSON schema sent as response_format; the reply is parsed and checked
// against the schema here, in the page.

import { api } from "./api.js";
import { $, readJSON, status } from "./dom.js";
import { validate } from "./schema.js";

const panel = $("#structured");

async function run() {
  const output = $(".output", panel);
  const verdict = $(".verdict", panel);
  output.textContent = "";
  verdict.textContent = "";
  try {
    const schema = readJSON($("[name=schema]", panel), "The schema");
    status(panel, "waiting for the model…");
    const body = await api("/v1/chat/completions", {
      json: {
        model: $("[name=model]", panel).value,
        messages: [{ role: "user", content: $("[name=prompt]", panel).value }],
        response_format: { type: "json_schema", json_schema: { name: "reply", schema, strict: true } },
        max_tokens: 256,
        temperature: 0,
      },
    });
    const choice = body.choices[0];
    output.textContent = choice.message.content;
    status(panel, `finish: ${choice.finish_reason}`, "ok");
    let parsed;
    try {
      parsed = JSON.parse(choice.message.content);
    } catch (err) {
      verdict.textContent = `✗ not JSON (${err.message})`;
      verdict.className = "verdict bad";
      return;
    }
    const problems = validate(parsed, schema);
    verdict.textContent = problems.length ? `✗ ${problems.join("; ")}` : "✓ valid against the schema";
    verdict.className = `verdict ${problems.length ? "bad" : "good"}`;
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", run);
}
