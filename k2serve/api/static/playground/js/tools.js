// Tools: declare a function by its JSON schema, see the model's call, send a result back
// and read the follow-up answer.

import { api } from "./api.js";
import { $, el, numberOrUndefined, readJSON, status } from "./dom.js";

const panel = $("#tools");
let conversation = [];
let pending = []; // the tool calls awaiting a result

function toolChoice(tools) {
  const choice = $("[name=tool_choice]", panel).value;
  if (choice !== "function") return choice;
  return { type: "function", function: { name: tools[0].function.name } };
}

function show(role, node, label = role) {
  $(".transcript", panel).append(el("div", { class: `message ${role}` }, el("b", {}, label), node));
}

async function ask(messages, tools, tool_choice) {
  const body = await api("/v1/chat/completions", {
    json: {
      model: $("[name=model]", panel).value,
      messages,
      tools,
      tool_choice,
      temperature: 0,
      max_tokens: numberOrUndefined($("[name=max_tokens]", panel)),
    },
  });
  const message = body.choices[0].message;
  conversation.push({ role: "assistant", content: message.content ?? null,
    ...(message.tool_calls ? { tool_calls: message.tool_calls } : {}) });
  pending = message.tool_calls || [];
  if (pending.length) {
    for (const call of pending) {
      show("call", el("code", { class: "tool-call", dataset: { name: call.function.name } },
        `${call.function.name}(${call.function.arguments})`), "tool call");
    }
    $("[name=result]", panel).disabled = false;
    $("[name=send_result]", panel).disabled = false;
  } else {
    show("assistant", el("span", { class: "answer" }, message.content || ""));
  }
  status(panel, `finish: ${body.choices[0].finish_reason}`, "ok");
}

function tools() {
  const declared = readJSON($("[name=schema]", panel), "The function");
  return [declared.type === "function" ? declared : { type: "function", function: declared }];
}

async function start() {
  try {
    const declared = tools();
    conversation = [{ role: "user", content: $("[name=prompt]", panel).value }];
    $(".transcript", panel).replaceChildren();
    show("user", el("span", {}, conversation[0].content));
    status(panel, "waiting for the model…");
    await ask(conversation, declared, toolChoice(declared));
  } catch (err) {
    status(panel, err.message, "error");
  }
}

async function sendResult() {
  try {
    const result = $("[name=result]", panel).value;
    for (const call of pending) {
      conversation.push({ role: "tool", tool_call_id: call.id, content: result });
      show("tool", el("code", {}, result));
    }
    pending = [];
    $("[name=result]", panel).disabled = true;
    $("[name=send_result]", panel).disabled = true;
    status(panel, "waiting for the model…");
    const followUp = $("[name=follow_up_text]", panel).checked ? "none" : "auto";
    await ask(conversation, tools(), followUp);
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", start);
  $("[name=send_result]", panel).addEventListener("click", sendResult);
}
