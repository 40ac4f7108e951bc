// A stacked bar chart in plain SVG: one bar per day, one colored segment per series
// (model or key), a legend under it.

import { svg } from "./bars.js";

const COLORS = ["#3b6fd8", "#e07b39", "#3aa675", "#b04fc4", "#c9a227", "#d9475a", "#2aa3b8", "#7a7a7a"];

// rows: [{day, series, value}] -> an <svg>
export function stackedBars(rows, { height = 260, format = String } = {}) {
  const sums = new Map(); // several rows may share a day and series (a key's models)
  for (const r of rows) sums.set(`${r.day}\n${r.series}`, (sums.get(`${r.day}\n${r.series}`) || 0) + r.value);
  const value = (day, name) => sums.get(`${day}\n${name}`) || 0;
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const series = [...new Set(rows.map((r) => r.series))];
  const totals = days.map((d) => series.reduce((sum, name) => sum + value(d, name), 0));
  const max = Math.max(...totals, 0) || 1;
  const left = 70, top = 10, plot = height - 50;
  const barWidth = 36, gap = 18;
  const width = Math.max(360, left + days.length * (barWidth + gap) + 20);
  const legendHeight = 20 * series.length + 10;
  const chart = svg("svg", { class: "usage-chart", width, height: height + legendHeight, role: "img" });
  chart.append(svg("line", { x1: left, y1: top, x2: left, y2: top + plot, class: "axis" }));
  chart.append(svg("line", { x1: left, y1: top + plot, x2: width - 10, y2: top + plot, class: "axis" }));
  chart.append(svg("text", { x: left - 6, y: top + 10, class: "tick", "text-anchor": "end" }, format(max)));
  chart.append(svg("text", { x: left - 6, y: top + plot, class: "tick", "text-anchor": "end" }, "0"));
  days.forEach((day, i) => {
    const x = left + gap / 2 + i * (barWidth + gap);
    let y = top + plot;
    for (const [s, name] of series.entries()) {
      const v = value(day, name);
      if (v <= 0) continue;
      const h = Math.max(1, (plot * v) / max);
      y -= h;
      const rect = svg("rect", { x, y, width: barWidth, height: h, fill: COLORS[s % COLORS.length],
        class: "segment", "data-day": day, "data-series": name, "data-value": v });
      rect.append(svg("title", {}, `${day} · ${name}: ${format(v)}`));
      chart.append(rect);
    }
    chart.append(svg("text", { x: x + barWidth / 2, y: top + plot + 16, class: "tick", "text-anchor": "middle" }, day.slice(5)));
  });
  series.forEach((name, s) => {
    const y = height + 10 + s * 20;
    chart.append(svg("rect", { x: left, y: y - 10, width: 12, height: 12, fill: COLORS[s % COLORS.length] }));
    chart.append(svg("text", { x: left + 18, y, class: "legend" }, name));
  });
  return chart;
}
