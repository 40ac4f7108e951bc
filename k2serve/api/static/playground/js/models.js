// The model pickers: every <select data-models="type,type"> gets the served models of those
// types from GET /v1/models, the first listed type first.

import { api } from "./api.js";
import { el } from "./dom.js";

let models = [];

export async function loadModels() {
  const body = await api("/v1/models");
  models = Array.isArray(body) ? body : body.data || [];
  for (const select of document.querySelectorAll("select[data-models]")) fill(select);
  return models;
}

function fill(select) {
  const types = select.dataset.models.split(",");
  const previous = select.value;
  const fitting = models
    .filter((m) => types.includes(m.type))
    .sort((a, b) => types.indexOf(a.type) - types.indexOf(b.type));
  select.replaceChildren(...fitting.map((m) => el("option", { value: m.id }, m.id)));
  if (fitting.some((m) => m.id === previous)) select.value = previous;
  if (!fitting.length) select.append(el("option", { value: "" }, "(no such model served)"));
}
