// Streams a chat or text completion; calls onText(fullTextSoFar) as tokens arrive.

import { api } from "./api.js";
import { sseEvents } from "./sse.js";

export async function streamCompletion(path, body, { onText, signal }) {
  const response = await api(path, { json: { ...body, stream: true }, signal, raw: true });
  let text = "";
  let usage = null;
  let finish = null;
  for await (const event of sseEvents(response)) {
    const choice = event.choices?.[0];
    const piece = choice?.delta?.content ?? choice?.text;
    if (piece) {
      text += piece;
      onText(text);
    }
    if (choice?.finish_reason) finish = choice.finish_reason;
    if (event.usage) usage = event.usage;
  }
  return { text, usage, finish };
}

export function describeUsage({ usage, finish }) {
  const parts = [];
  if (finish) parts.push(`finish: ${finish}`);
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  return parts.join(" · ");
}
