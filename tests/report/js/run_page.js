// Loads an HTML report in jsdom, runs its scripts and reports what they did, as JSON on
// stdout: errors, whether the timeline was redrawn, the totals it plots, the tooltip at the
// peak, and the view after a wheel zoom, a drag, a double-click and "zoom to peak".
// Usage: node run_page.js report.html
"use strict";
const fs = require("fs");
const {JSDOM, VirtualConsole} = require("jsdom");

const html = fs.readFileSync(process.argv[2], "utf8");
const errors = [];
const vc = new VirtualConsole();
vc.on("jsdomError", e => errors.push(String(e && (e.stack || e.message) || e)));
vc.on("error", e => errors.push(String(e)));
const dom = new JSDOM(html, {runScripts: "dangerously", virtualConsole: vc,
                             pretendToBeVisual: true});
const w = dom.window, doc = w.document;
const out = {errors, hasApi: !!w.memprofReport};
const svg = doc.getElementById("timeline-svg");
if (w.memprofReport && svg) {
  const api = w.memprofReport;
  out.rendered = svg.getAttribute("data-rendered");
  out.layers = Array.from(svg.querySelectorAll("path.layer")).map(p => p.getAttribute("data-category"));
  out.maxTotal = Math.max(...api.visibleTotals());
  out.initialView = [api.state.t0, api.state.t1];
  const peakT = JSON.parse(doc.getElementById("memprof-data").textContent).timeline.peak.t;
  out.peakT = peakT;
  out.peakTooltip = api.hoverAt(peakT);
  out.tooltipShown = !doc.getElementById("tooltip").hidden;
  // a wheel zoom in at the peak, in viewBox units (jsdom elements have no size)
  const left = +svg.dataset.left, pw = +svg.dataset.pw;
  for (let k = 0; k < 30; k++) {
    // the cursor stays on the peak, as a user's would: where that is moves when a zoom near
    // the end of the run is shifted back inside it
    const x = left + (peakT - api.state.t0) / (api.state.t1 - api.state.t0) * pw;
    svg.dispatchEvent(new w.WheelEvent("wheel", {deltaY: -100, clientX: x, bubbles: true,
                                                 cancelable: true}));
  }
  out.zoomedView = [api.state.t0, api.state.t1];
  out.zoomedMax = Math.max(...api.visibleTotals());
  out.zoomedPoints = api.visibleTotals().length;
  out.zoomedUsesDetail = api.state.points.length > 0 && api.state.points[0].src === api.detail;
  // the cursor over the peak in the zoomed view (recomputed: the zoom moved the axis; a hair to
  // the right, since the tooltip shows the last event at or before the cursor's time)
  const span = api.state.t1 - api.state.t0;
  const xZoomed = left + (peakT + 1e-6 * span - api.state.t0) / span * pw;
  out.mousemoveTooltip = (svg.dispatchEvent(new w.MouseEvent("mousemove", {clientX: xZoomed, bubbles: true})),
                          doc.getElementById("tooltip").textContent);
  svg.dispatchEvent(new w.MouseEvent("mousedown", {clientX: left + pw / 2, bubbles: true}));
  svg.dispatchEvent(new w.MouseEvent("mousemove", {clientX: left + pw / 4, bubbles: true}));
  w.dispatchEvent(new w.MouseEvent("mouseup", {bubbles: true}));
  out.pannedView = [api.state.t0, api.state.t1];
  svg.dispatchEvent(new w.MouseEvent("dblclick", {bubbles: true}));
  out.resetView = [api.state.t0, api.state.t1];
  // the "zoom to peak" button, from the whole run
  Array.from(doc.querySelectorAll(".toolbar button")).find(b => b.textContent === "zoom to peak").click();
  out.peakView = [api.state.t0, api.state.t1];
  out.peakViewMax = Math.max(...api.visibleTotals());
  out.peakViewUsesDetail = api.state.points.length > 0 && api.state.points[0].src === api.detail;
  svg.dispatchEvent(new w.MouseEvent("dblclick", {bubbles: true}));
  out.buttons = Array.from(doc.querySelectorAll(".toolbar button")).map(b => b.textContent);
}
process.stdout.write(JSON.stringify(out));
