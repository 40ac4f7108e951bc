// Horizontal bars in plain SVG: one row per item, its value (0..max) as the bar's length.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function barChart(items, { max = 1, width = 640, labelWidth = 300, format = (v) => v.toFixed(3) } = {}) {
  const row = 28;
  const chart = svg("svg", { class: "bars", width, height: items.length * row + 4, role: "img" });
  const room = width - labelWidth - 60;
  items.forEach((item, i) => {
    const y = i * row + 2;
    const g = svg("g", { class: "bar", "data-index": item.index, "data-value": item.value });
    g.append(svg("title", {}, item.title || item.label));
    const label = item.label.length > 42 ? `${item.label.slice(0, 41)}…` : item.label;
    g.append(svg("text", { x: 0, y: y + 17, class: "bar-label" }, label));
    const length = Math.max(1, (room * Math.max(0, item.value)) / max);
    g.append(svg("rect", { x: labelWidth, y: y + 4, width: length, height: row - 10, rx: 3 }));
    g.append(svg("text", { x: labelWidth + length + 6, y: y + 17, class: "bar-value" }, format(item.value)));
    chart.append(g);
  });
  return chart;
}

export { svg };
