// Line charts drawn as SVG, redrawn as points arrive (no library: everything is served from here).

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df"];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function ticks(lo, hi, count = 4) {
  if (lo === hi) return [lo];
  const step = (hi - lo) / count;
  return Array.from({ length: count + 1 }, (_, i) => lo + i * step);
}

function label(value) {
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 0.01 || magnitude >= 1e5)) return value.toExponential(1);
  return Number(value.toFixed(magnitude < 1 ? 3 : magnitude < 100 ? 2 : 0)).toString();
}

export class LiveChart {
  // title: what it shows; xLabel/yLabel: axis names; the chart is an <figure> with an SVG inside.
  constructor(title, xLabel, yLabel, { width = 460, height = 220 } = {}) {
    this.title = title;
    this.xLabel = xLabel;
    this.yLabel = yLabel;
    this.width = width;
    this.height = height;
    this.series = new Map();
    this.node = document.createElement("figure");
    this.node.className = "chart";
    this.svg = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.node.append(this.svg, caption);
    this.pending = false;
    this.draw();
  }

  get points() {
    let n = 0;
    for (const points of this.series.values()) n += points.length;
    return n;
  }

  add(name, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    const points = this.series.get(name);
    const last = points[points.length - 1];
    if (last && last[0] === x) points[points.length - 1] = [x, y];
    else if (!last || last[0] < x) points.push([x, y]);
    else return; // an older point (a replay): already drawn
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  draw() {
    const { width, height } = this;
    const pad = { left: 56, right: 12, top: 12, bottom: 40 };
    const all = [...this.series.values()].flat();
    this.svg.replaceChildren();
    this.svg.setAttribute("aria-label", `${this.title}: ${all.length} point(s)`);
    this.svg.dataset.points = String(all.length);
    if (!all.length) {
      this.svg.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
        "waiting for data…"));
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
    const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
    const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
    const axes = svg("g", { class: "axes" });
    axes.append(svg("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom }));
    axes.append(svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom }));
    for (const y of ticks(y0, y1)) {
      axes.append(svg("text", { x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end" }, label(y)));
      axes.append(svg("line", { class: "grid", x1: pad.left, y1: sy(y), x2: width - pad.right, y2: sy(y) }));
    }
    for (const x of ticks(x0, x1)) {
      axes.append(svg("text", { x: sx(x), y: height - pad.bottom + 16, "text-anchor": "middle" }, label(x)));
    }
    axes.append(svg("text", { x: (width + pad.left) / 2, y: height - 6, "text-anchor": "middle" }, this.xLabel));
    axes.append(svg("text", { x: 12, y: pad.top + 4, transform: `rotate(-90 12 ${height / 2})`,
      "text-anchor": "end", dy: height / 2 - pad.top }, this.yLabel));
    this.svg.append(axes);
    let i = 0;
    for (const [name, points] of this.series) {
      const color = COLORS[i % COLORS.length];
      const d = points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      const path = svg("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series" });
      path.append(svg("title", {}, name));
      this.svg.append(path);
      if (points.length === 1) {
        this.svg.append(svg("circle", { cx: sx(points[0][0]), cy: sy(points[0][1]), r: 3, fill: color }));
      }
      if (this.series.size > 1) {
        this.svg.append(svg("text", { x: width - pad.right - 4, y: pad.top + 12 + 14 * i, fill: color,
          "text-anchor": "end" }, name));
      }
      i += 1;
    }
  }
}
