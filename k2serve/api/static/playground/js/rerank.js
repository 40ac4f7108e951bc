// Rerank: a query and documents (the seed's Peru example), the scores drawn as bars in the
// order the API ranks them.

import { api } from "./api.js";
import { $, numberOrUndefined, status } from "./dom.js";
import { barChart } from "./bars.js";

const panel = $("#rerank");

async function run() {
  const documents = $("[name=documents]", panel).value.split("\n").map((d) => d.trim()).filter(Boolean);
  const chart = $(".chart", panel);
  chart.replaceChildren();
  try {
    status(panel, "ranking…");
    const body = await api("/v1/rerank", {
      json: {
        model: $("[name=model]", panel).value,
        query: $("[name=query]", panel).value,
        documents,
        top_n: numberOrUndefined($("[name=top_n]", panel)),
      },
    });
    chart.append(barChart(body.results.map((r) => ({
      index: r.index,
      value: r.relevance_score,
      label: documents[r.index],
      title: `#${r.index}: ${documents[r.index]}`,
    }))));
    status(panel, `${body.usage?.prompt_tokens ?? "?"} tokens`, "ok");
  } catch (err) {
    status(panel, err.message, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", run);
}
