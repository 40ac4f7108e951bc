// Wires the page: the key field, the tabs (by URL fragment: #chat, #rerank, ...), the
// model pickers, and each panel.

import { getKey, setKey } from "./api.js";
import { $ } from "./dom.js";
import { loadModels } from "./models.js";
import * as chat from "./chat.js";
import * as completions from "./completions.js";
import * as embeddings from "./embeddings.js";
import * as rerank from "./rerank.js";
import * as speech from "./speech.js";
import * as structured from "./structured.js";
import * as tools from "./tools.js";
import * as transcribe from "./transcribe.js";
import * as usage from "./usage.js";

const header = $("header");

function showTab() {
  const id = location.hash.slice(1) || "chat";
  const panel = document.getElementById(id);
  if (!panel?.classList.contains("panel")) return;
  for (const section of document.querySelectorAll(".panel")) section.hidden = section !== panel;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === `#${id}`);
  }
  if (id === "usage") usage.refresh();
}

async function connect() {
  const line = $(".key-status", header);
  line.textContent = getKey() ? "key set for this tab" : "no key: open mode (a server on localhost with no key made)";
  try {
    const models = await loadModels();
    line.textContent += ` · ${models.length} models`;
    line.className = "key-status ok";
    speech.loadVoices();
  } catch (err) {
    line.textContent = err.message;
    line.className = "key-status error";
  }
}

function useKey(key) {
  setKey(key.trim());
  $("[name=api_key]", header).value = "";
  usage.forgetKeys();
  connect().then(() => {
    if (location.hash === "#usage") usage.refresh();
  });
}

for (const panel of [chat, tools, structured, completions, embeddings, rerank, speech, transcribe, usage]) {
  panel.init();
}
$("[name=use_key]", header).addEventListener("click", () => useKey($("[name=api_key]", header).value));
$("[name=api_key]", header).addEventListener("keydown", (event) => {
  if (event.key === "Enter") useKey(event.target.value);
});
$("[name=forget_key]", header).addEventListener("click", () => useKey(""));
window.addEventListener("hashchange", showTab);
showTab();
connect();
