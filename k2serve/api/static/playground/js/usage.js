// Usage: the current key's tokens and cost per day and model, and, for an admin key, any
// key's (or every key's, one color per key).

import { api } from "./api.js";
import { $, el, status } from "./dom.js";
import { stackedBars } from "./chart.js";

const panel = $("#usage");
// small costs keep their significant digits: $0.00000035, not $0.000000
const usd = (v) => (v === 0 ? "$0" : v >= 0.01 ? `$${v.toFixed(4)}` : `$${v.toPrecision(2)}`);

const METRICS = {
  total_tokens: { label: "tokens", format: (v) => String(Math.round(v)) },
  cost_usd: { label: "cost (USD)", format: (v) => usd(v) },
  requests: { label: "requests", format: (v) => String(v) },
};

function table(rows, withKey) {
  const head = ["day", ...(withKey ? ["key"] : []), "model", "requests", "prompt", "completion", "cost (USD)"];
  return el("table", { class: "usage-table" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {},
      el("td", {}, r.day), ...(withKey ? [el("td", {}, r.key ?? "(no key)")] : []),
      el("td", {}, r.model ?? "—"), el("td", {}, String(r.requests)),
      el("td", {}, String(r.prompt_tokens)), el("td", {}, String(r.completion_tokens)),
      el("td", {}, usd(r.cost_usd))))));
}

function draw(target, rows, seriesOf, withKey) {
  const metric = METRICS[$("[name=metric]", panel).value];
  const name = $("[name=metric]", panel).value;
  target.replaceChildren();
  if (!rows.length) {
    target.append(el("p", { class: "empty" }, "No usage in this period."));
    return;
  }
  target.append(stackedBars(rows.map((r) => ({ day: r.day, series: seriesOf(r), value: r[name] })),
    { format: metric.format }), table(rows, withKey));
}

async function mine() {
  const since = $("[name=since]", panel).value;
  try {
    const body = await api(`/v1/usage?since=${encodeURIComponent(since)}`);
    $(".who", panel).textContent = body.key ? `key “${body.key}”` : "open mode (no key)";
    draw($(".mine", panel), body.data, (r) => r.model ?? "—", false);
    status(panel, "", "");
  } catch (err) {
    status(panel, err.message, "error");
  }
}

async function admin() {
  const section = $(".admin", panel);
  const select = $("[name=key]", panel);
  const since = $("[name=since]", panel).value;
  try {
    if (!select.options.length) {
      const totals = await api(`/admin/usage?since=${encodeURIComponent(since)}`);
      select.replaceChildren(el("option", { value: "" }, "every key"),
        ...totals.keys.filter((k) => k.key).map((k) => el("option", { value: k.key }, k.key)));
    }
    const key = select.value;
    const query = `since=${encodeURIComponent(since)}${key ? `&key=${encodeURIComponent(key)}` : ""}`;
    const body = await api(`/admin/usage/daily?${query}`);
    section.hidden = false;
    draw($(".per-key", panel), body.data, (r) => (key ? r.model ?? "—" : r.key ?? "(no key)"), true);
  } catch (err) {
    // 403 for a key that is not an admin's: the section stays hidden
    section.hidden = !(err.status && err.status !== 403 && err.status !== 401);
    if (!section.hidden) $(".per-key", panel).textContent = err.message;
  }
}

export function refresh() {
  return Promise.all([mine(), admin()]);
}

export function forgetKeys() {
  $("[name=key]", panel).replaceChildren();
}

export function init() {
  $("[name=refresh]", panel).addEventListener("click", refresh);
  for (const name of ["since", "metric", "key"]) $(`[name=${name}]`, panel).addEventListener("change", refresh);
}
