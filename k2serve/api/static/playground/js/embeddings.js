// Embeddings: one vector per line; shows each vector's start and the cosine similarity of
// every line to the first, as bars.

import { api } from "./api.js";
import { $, el, status } from "./dom.js";
import { barChart } from "./bars.js";

const panel = $("#embeddings");

const dot = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);
const cosine = (a, b) => dot(a, b) / Math.sqrt(dot(a, a) * dot(b, b));

async function run() {
  const inputs = $("[name=input]", panel).value.split("\n").map((s) => s.trim()).filter(Boolean);
  const out = $(".output", panel);
  out.replaceChildren();
  try {
    status(panel, "embedding…");
    const body = await api("/v1/embeddings", { json: { model: $("[name=model]", panel).value, input: inputs } });
    const vectors = body.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    for (const [i, vector] of vectors.entries()) {
      const head = vector.slice(0, 6).map((x) => x.toFixed(4)).join(", ");
      out.append(el("div", { class: "vector" }, el("b", {}, `#${i}`), ` ${vector.length} dims: [${head}, …]`));
    }
    if (vectors.length > 1) {
      out.append(el("h3", {}, "Cosine similarity to the first line"));
      out.append(barChart(vectors.slice(1).map((v, i) => ({
        index: i + 1, value: cosine(vectors[0], v), label: inputs[i + 1],
      }))));
    }
    status(panel, `${body.usage?.prompt_tokens ?? "?"} tokens`, "ok");
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", run);
}
