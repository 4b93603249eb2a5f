// memprof HTML report: zoom, pan and hover for the memory timeline. The page is complete
// without this script (the charts are static SVG); it redraws the timeline from the data
// embedded in <script id="memprof-data"> at any zoom, keeping each pixel column's highest
// and lowest point so that no peak disappears. Exposes window.memprofReport for tests.
(function () {
  "use strict";
  var blob = document.getElementById("memprof-data");
  var svgEl = document.getElementById("timeline-svg");
  if (!blob || !svgEl) return;
  var T = JSON.parse(blob.textContent).timeline;
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = {parameters: "#4e79a7", gradients: "#f28e2c", optimizer_state: "#59a14f",
                activations: "#e15759", temporaries: "#edc949", other: "#bab0ab",
                communication: "#76b7b2", buffers: "#b07aa1",
                recomputed_weights: "#9c755f"};
  var PHASE_COLORS = ["#4e79a7", "#f28e2c", "#59a14f"];
  var box = svgEl.viewBox.baseVal;
  var W = box ? box.width : 960, H = box ? box.height : 300;
  var L = +svgEl.dataset.left, TOP = +svgEl.dataset.top;
  var PW = +svgEl.dataset.pw, PH = +svgEl.dataset.ph, TMAX = +svgEl.dataset.tmax;
  var tooltip = document.getElementById("tooltip");

  function undelta(a) {
    var out = new Array(a.length), s = 0;
    for (var i = 0; i < a.length; i++) { s += a[i]; out[i] = s; }
    return out;
  }
  function decode(p) {
    if (!p) return null;
    var d = {t: undelta(p.t), c: p.c.map(undelta), step: undelta(p.step), phase: p.phase,
             op: p.op, module: p.module, event: undelta(p.event)};
    d.total = d.t.map(function (_, i) {
      var s = 0;
      for (var k = 0; k < d.c.length; k++) s += d.c[k][i];
      return s;
    });
    return d;
  }
  var coarse = decode(T.points), detail = decode(T.detail);

  function fmtBytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], sign = n < 0 ? "-" : "", v = Math.abs(n);
    for (var i = 0; i < units.length; i++) {
      if (v < 1024 || i === units.length - 1)
        return sign + (i === 0 ? v.toFixed(0) : v.toFixed(2)) + " " + units[i];
      v /= 1024;
    }
  }
  function fmtTime(us) {
    if (us >= 60e6) return (us / 60e6).toFixed(1) + " min";
    if (us >= 1e6) return (us / 1e6).toFixed(2) + " s";
    if (us >= 1e3) return (us / 1e3).toFixed(1) + " ms";
    return us.toFixed(0) + " us";
  }
  function niceCeil(x) {
    if (x <= 0) return 1;
    var e = Math.pow(10, Math.floor(Math.log10(x))), m = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < m.length; i++) if (m[i] * e >= x) return m[i] * e;
    return 10 * e;
  }
  function niceBytes(x) {  // as report/svg.py nice_bytes: nice in the binary unit shown
    var unit = 1;
    while (x >= 1024 * unit && unit < Math.pow(1024, 4)) unit *= 1024;
    return niceCeil(x / unit) * unit;
  }
  function bisect(a, x) {  // first index with a[i] > x
    var lo = 0, hi = a.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (a[mid] <= x) lo = mid + 1; else hi = mid; }
    return lo;
  }

  var state = {t0: 0, t1: TMAX, yMax: +svgEl.dataset.ymax, points: []};
  function xOf(t) { return L + (t - state.t0) / (state.t1 - state.t0) * PW; }
  function yOf(v) { return TOP + PH - v / state.yMax * PH; }
  function source() {
    if (detail && detail.t.length && state.t0 >= detail.t[0] &&
        state.t1 <= detail.t[detail.t.length - 1]) return detail;
    return coarse;
  }

  // Points drawn in the view: the one before t0 (its value holds into the view), then per
  // pixel column the highest and the lowest point, in time order.
  function visible(src) {
    var lo = Math.max(0, bisect(src.t, state.t0) - 1), hi = bisect(src.t, state.t1);
    var out = [], col = null, best = -1, worst = -1;
    function flush() {
      if (best < 0) return;
      if (worst !== best) out.push(Math.min(best, worst), Math.max(best, worst));
      else out.push(best);
    }
    for (var i = lo; i < hi; i++) {
      var c = Math.floor(xOf(Math.max(src.t[i], state.t0)));
      if (c !== col) { flush(); col = c; best = worst = i; continue; }
      if (src.total[i] > src.total[best]) best = i;
      if (src.total[i] < src.total[worst]) worst = i;
    }
    flush();
    return out;
  }

  function areaPath(xs, top, bottom, xEnd) {
    var d = "M" + xs[0] + "," + bottom[0], i;
    for (i = 0; i < xs.length; i++) d += "V" + top[i] + "H" + (i + 1 < xs.length ? xs[i + 1] : xEnd);
    for (i = xs.length - 1; i >= 0; i--) d += "V" + bottom[i] + "H" + xs[i];
    return d + "Z";
  }

  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function drawSpans(g, spans, y, h, color, title) {
    spans.forEach(function (sp) {
      if (sp[1] < state.t0 || sp[0] > state.t1) return;
      var x0 = Math.max(L, xOf(sp[0])), x1 = Math.min(L + PW, xOf(sp[1]));
      if (x1 - x0 < 1) return;  // narrower than a pixel: shown when zoomed in
      var r = el("rect", {x: x0.toFixed(1), y: y, width: (x1 - x0).toFixed(1),
                          height: h, fill: color(sp)});
      r.appendChild(el("title", {}, title(sp)));
      g.appendChild(r);
    });
  }

  function stepTitle(s) {  // as html.step_title: "step 3 (partial)"
    var note = (T.step_notes || {})[s[2]];
    return "step " + s[2] + (note ? " (" + note + ")" : "");
  }

  function drawAxes(g) {
    for (var k = 0; k <= 4; k++) {
      var v = state.yMax * k / 4, y = Math.round(yOf(v));
      g.appendChild(el("line", {x1: L, x2: L + PW, y1: y, y2: y, stroke: "#e5e5e5"}));
      g.appendChild(el("text", {x: L - 4, y: y + 4, "text-anchor": "end", "font-size": 11,
                                fill: "#444"}, fmtBytes(v)));
    }
    for (k = 0; k <= 5; k++) {
      var t = state.t0 + (state.t1 - state.t0) * k / 5;
      var tx = Math.round(xOf(t));
      g.appendChild(el("text", {x: tx, y: H - 8, "text-anchor": tx > W - 40 ? "end" : "middle",
                                "font-size": 11, fill: "#444"}, fmtTime(t)));
    }
  }

  function render() {
    var src = source(), idx = visible(src);
    var peakInView = 0;
    idx.forEach(function (i) { peakInView = Math.max(peakInView, src.total[i]); });
    state.yMax = niceBytes(peakInView);
    state.points = idx.map(function (i) { return {src: src, i: i}; });
    while (svgEl.firstChild) svgEl.removeChild(svgEl.firstChild);
    var clip = el("clipPath", {id: "plot-clip"});
    clip.appendChild(el("rect", {x: L, y: 0, width: PW, height: TOP + PH}));
    svgEl.appendChild(clip);
    var bands = el("g", {"clip-path": "url(#plot-clip)"});
    drawSpans(bands, T.steps.filter(function (s) { return s[2] % 2 === 0; }), TOP, PH,
              function () { return "#f3f4f6"; }, stepTitle);
    svgEl.appendChild(bands);
    var layers = el("g", {"clip-path": "url(#plot-clip)"});
    if (idx.length) {
      var xs = idx.map(function (i) { return Math.round(Math.max(L, xOf(src.t[i]))); });
      var base = idx.map(function () { return 0; });
      T.categories.forEach(function (name, k) {
        var col = idx.map(function (i) { return src.c[k][i]; });
        if (!col.some(function (v) { return v !== 0; })) return;
        var top = base.map(function (b, j) { return b + col[j]; });
        var p = el("path", {"class": "layer", "data-category": name, fill: COLORS[name],
                            d: areaPath(xs, top.map(function (v) { return Math.round(yOf(v)); }),
                                        base.map(function (v) { return Math.round(yOf(v)); }),
                                        Math.round(Math.min(L + PW, xOf(TMAX))))});
        p.appendChild(el("title", {}, name));
        layers.appendChild(p);
        base = top;
      });
    }
    svgEl.appendChild(layers);
    var strip = el("g", {});
    drawSpans(strip, T.spans, TOP + PH + 2, 8, function (s) { return PHASE_COLORS[s[2]]; },
              function (s) { return T.span_names[s[2]]; });
    svgEl.appendChild(strip);
    drawAxes(svgEl);
    if (T.peak.t !== undefined && T.peak.t >= state.t0 && T.peak.t <= state.t1) {
      var px = Math.round(xOf(T.peak.t));
      svgEl.appendChild(el("line", {"class": "peak", x1: px, x2: px, y1: TOP, y2: TOP + PH,
                                    stroke: "#b91c1c", "stroke-dasharray": "4 3"}));
      svgEl.appendChild(el("text", {x: px + 4, y: TOP + 12, fill: "#b91c1c", "font-size": 12},
                               "peak " + fmtBytes(T.peak.bytes)));
    }
    svgEl.appendChild(el("line", {id: "cursor", x1: -10, x2: -10, y1: TOP, y2: TOP + PH,
                                  stroke: "#111", "stroke-width": 1}));
    svgEl.setAttribute("data-rendered", "js");
  }

  function describe(src, i) {
    var lines = ["time " + fmtTime(src.t[i]) + ", step " + src.step[i] + ", " +
                 (T.phases[src.phase[i]] || "other"),
                 "op " + T.ops[src.op[i]], "module " + T.modules[src.module[i]],
                 "live " + fmtBytes(src.total[i])];
    T.categories.forEach(function (name, k) {
      if (src.c[k][i]) lines.push("  " + name + " " + fmtBytes(src.c[k][i]));
    });
    return lines.join("\n");
  }

  function hoverAt(t) {  // the event whose value is shown at time t: the last at or before t
    var src = source(), i = Math.max(0, bisect(src.t, t) - 1);
    var text = describe(src, i), cur = document.getElementById("cursor");
    var x = Math.round(xOf(Math.max(src.t[i], state.t0)));
    if (cur) { cur.setAttribute("x1", x); cur.setAttribute("x2", x); }
    if (tooltip) {
      tooltip.textContent = text;
      tooltip.hidden = false;
      tooltip.style.left = Math.min(x / W * 100, 70) + "%";
      tooltip.style.top = "10px";
    }
    return text;
  }

  function setView(t0, t1) {
    var span = Math.max(t1 - t0, 10);
    t0 = Math.max(0, Math.min(t0, TMAX - span));
    state.t0 = t0;
    state.t1 = Math.min(TMAX, t0 + span);
    render();
  }
  function zoom(factor, at) {
    var c = at === undefined ? (state.t0 + state.t1) / 2 : at;
    setView(c - (c - state.t0) * factor, c + (state.t1 - c) * factor);
  }

  function tAt(evt) {  // time under the mouse (viewBox units when the element has no size)
    var r = svgEl.getBoundingClientRect();
    var x = r.width ? (evt.clientX - r.left) / r.width * W : evt.clientX;
    return state.t0 + (x - L) / PW * (state.t1 - state.t0);
  }

  var drag = null;
  svgEl.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom(e.deltaY < 0 ? 0.7 : 1 / 0.7, tAt(e));
  });
  svgEl.addEventListener("mousedown", function (e) { drag = {t: tAt(e), t0: state.t0, t1: state.t1}; });
  window.addEventListener("mouseup", function () { drag = null; });
  svgEl.addEventListener("mousemove", function (e) {
    if (drag) {
      var dt = drag.t - (drag.t0 + (tAt(e) - state.t0));
      setView(drag.t0 + dt, drag.t1 + dt);
    }
    hoverAt(tAt(e));
  });
  svgEl.addEventListener("mouseleave", function () { if (tooltip) tooltip.hidden = true; });
  svgEl.addEventListener("dblclick", function () { setView(0, TMAX); });

  // The events around the peak (html_data.peak_window), whether or not the run was long
  // enough to embed them all (`detail`): zooming to detail's extent did nothing without it.
  function zoomToPeak() {
    var w = T.peak_window;
    if (w) setView(w[0], w[1]);
  }

  var bar = document.createElement("div");
  bar.className = "toolbar";
  [["zoom in", function () { zoom(0.5); }], ["zoom out", function () { zoom(2); }],
   ["zoom to peak", zoomToPeak], ["reset", function () { setView(0, TMAX); }]].forEach(function (b) {
    var btn = document.createElement("button");
    btn.type = "button";
    btn.textContent = b[0];
    btn.addEventListener("click", b[1]);
    bar.appendChild(btn);
  });
  var chart = document.getElementById("timeline-chart");
  chart.parentNode.insertBefore(bar, chart);
  var hint = document.getElementById("timeline-hint");
  if (hint) hint.textContent = "Scroll to zoom, drag to pan, double-click to reset; hover " +
    "for the event under the cursor. " + hint.textContent;

  render();
  window.memprofReport = {
    state: state, coarse: coarse, detail: detail, render: render, setView: setView,
    zoom: zoom, zoomToPeak: zoomToPeak, hoverAt: hoverAt,
    visibleTotals: function () { return state.points.map(function (p) { return p.src.total[p.i]; }); }
  };
})();
