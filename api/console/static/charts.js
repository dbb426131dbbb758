// Charts drawn with uPlot (vendored, MIT): metric time series and a matrix's normalised spectrum.
import { el } from "./util.js";

// Metric groups of the job page: a chart each, drawn once one of its series has a value.
export const METRIC_GROUPS = [
  { id: "loss", title: "Loss", keys: ["loss", "val_loss"] },
  { id: "ppl", title: "Validation perplexity", keys: ["val_ppl", "ppl"] },
  { id: "throughput", title: "Throughput (/s)", keys: ["tokens_per_s", "items_per_s"] },
  { id: "memory", title: "Memory (MB)", keys: ["rss_mb", "gpu_mem_mb"] },
];
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];

function size(container) {
  return { width: Math.max(280, Math.min(container.clientWidth || 460, 560)), height: 200 };
}

// One chart per group from metric events [{t (s since start), values}]; redraws in place.
export class MetricCharts {
  constructor(container) {
    this.container = container;
    this.points = [];
    this.charts = new Map();
    this.pending = false;
  }

  add(t, values) {
    this.points.push({ t, values });
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  draw() {
    for (const g of METRIC_GROUPS) {
      const keys = g.keys.filter((k) => this.points.some((p) => typeof p.values[k] === "number"));
      if (!keys.length) continue;
      const pts = this.points.filter((p) => keys.some((k) => typeof p.values[k] === "number"));
      const data = [pts.map((p) => p.t), ...keys.map((k) => pts.map((p) => (typeof p.values[k] === "number" ? p.values[k] : null)))];
      const have = this.charts.get(g.id);
      if (have && have.keys.join() === keys.join()) { have.plot.setData(data); continue; }
      if (have) { have.plot.destroy(); have.box.remove(); }
      const box = el("div", { class: "chart", "data-chart": g.id }, el("h3", {}, g.title));
      this.container.append(box);
      const plot = new uPlot({
        ...size(this.container),
        scales: { x: { time: false } },
        axes: [{ label: "seconds" }, {}],
        series: [{ label: "s" }, ...keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: pts.length < 60 } }))],
      }, data, box);
      this.charts.set(g.id, { plot, box, keys });
    }
  }

  destroy() { for (const c of this.charts.values()) c.plot.destroy(); this.charts.clear(); }
}

// z (descending, at evenly spaced ranks) against the rank fraction, with τ and the kept rank.
export function spectrumChart(container, matrix, tau) {
  container.replaceChildren();
  const title = el("h3", {}, `${matrix.name}: kept ${matrix.kept_rank} of ${matrix.rank} ranks (${matrix.label})`);
  container.append(title);
  const z = matrix.spectrum_z;
  if (!z || !z.length) {
    container.append(el("p", { class: "muted" }, "This checkpoint does not record the matrix's spectrum (spectrum_z)."));
    return null;
  }
  const n = z.length;
  const xs = z.map((_, i) => (n === 1 ? 0 : (i / (n - 1)) * (matrix.rank - 1)));
  const series = [{ label: "rank" }, { label: "z", stroke: "#2563eb", width: 2 }];
  const data = [xs, z];
  if (typeof tau === "number") {
    series.push({ label: "τ", stroke: "#dc2626", dash: [6, 4], width: 1.5 });
    data.push(xs.map(() => tau));
  }
  return new uPlot({
    ...size(container),
    scales: { x: { time: false }, y: { range: [0, 1] } },
    axes: [{ label: "rank index" }, { label: "normalised σ (z)" }],
    series,
  }, data, container);
}
