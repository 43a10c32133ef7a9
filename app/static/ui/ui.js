// The dashboard's only script: local times, the copy button, and charts (uPlot).
// Loaded from the package under a Content-Security-Policy that allows no inline script;
// chart data comes from the page's <script type="application/json" id="chart-data">.
"use strict";

function localTimes() {
  for (const el of document.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (!isNaN(when)) {
      el.title = el.getAttribute("datetime");
      el.textContent = when.toLocaleString();
    }
  }
}

function copyButtons() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch (err) {  // no clipboard API (plain HTTP): select it for Ctrl+C
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        document.execCommand("copy");
      }
      button.textContent = "Copied";
    });
  }
}

const COLOURS = ["#2f6fde", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#1098ad",
                 "#f08c00", "#5c940d", "#862e9c", "#495057"];

function chartSeries(kind, data) {
  if (kind === "requests" || kind === "tokens" || kind === "gpu_seconds") {
    return data.models.map((model, i) => ({label: model, values: data[kind][model],
                                           colour: COLOURS[i % COLOURS.length]}));
  }
  if (kind === "rates") {
    return [{label: "errors %", values: data.error_rate, colour: COLOURS[3]},
            {label: "refusals %", values: data.refusal_rate, colour: COLOURS[1]}];
  }
  return [{label: "latency p50", values: data.latency_p50, colour: COLOURS[0]},
          {label: "latency p95", values: data.latency_p95, colour: COLOURS[4]},
          {label: "first byte p50", values: data.ttfb_p50, colour: COLOURS[2]},
          {label: "first byte p95", values: data.ttfb_p95, colour: COLOURS[6]}];
}

function compact(value) {  // 1.5M, 350k: axis labels that fit
  const size = Math.abs(value);
  for (const [unit, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (size >= unit) {
      return (value / unit).toLocaleString(undefined, {maximumFractionDigits: 1}) + suffix;
    }
  }
  return value.toLocaleString(undefined, {maximumFractionDigits: 2});
}

function drawCharts() {
  const source = document.getElementById("chart-data");
  if (!source || typeof uPlot === "undefined") {
    return;
  }
  const data = JSON.parse(source.textContent);
  for (const el of document.querySelectorAll(".chart[data-chart]")) {
    const lines = chartSeries(el.dataset.chart, data);
    const options = {
      width: Math.max(300, el.clientWidth || 560),
      height: 220,
      series: [{}].concat(lines.map((line) => ({
        label: line.label, stroke: line.colour, width: 2, spanGaps: false,
        points: {show: data.times.length < 80},
      }))),
      axes: [{}, {size: 56, values: (u, splits) => splits.map(compact)}],
      scales: {y: {range: (u, low, high) => [0, Math.max(1, high * 1.1)]}},
    };
    if (lines.length === 0) {  // nothing in this range: an empty line still draws the axes
      options.series.push({label: "none", stroke: COLOURS[9]});
      lines.push({values: data.times.map(() => 0)});
    }
    new uPlot(options, [data.times].concat(lines.map((line) => line.values)), el);
    el.dataset.points = lines.reduce(
      (n, line) => n + line.values.filter((v) => v !== null && v > 0).length, 0);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes();
  copyButtons();
  drawCharts();
});
