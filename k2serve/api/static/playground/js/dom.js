// Small DOM helpers shared by the panels.

export const $ = (selector, root = document) => root.querySelector(selector);

// el("div", {class: "x", onclick: f}, child, "text") -> an element
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// Shows `text` in a panel's status line; `kind` is "error", "ok" or "" (plain).
export function status(panel, text, kind = "") {
  const line = $(".status", panel);
  line.textContent = text;
  line.className = `status ${kind}`;
}

export function readJSON(textarea, what) {
  try {
    return JSON.parse(textarea.value);
  } catch (err) {
    throw new Error(`${what} is not valid JSON: ${err.message}`);
  }
}

export function numberOrUndefined(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}
