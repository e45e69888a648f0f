// The job page's charts (uPlot, served from /static/vendor/uplot/): test accuracy, loss
// and throughput against seconds since the job started. A point at every evaluation, and
// a throughput point at every poll (each second) while the job trains. The researcher's
// other runs on the same dataset share the accuracy and loss charts, toggled below them.
(function () {
  "use strict";
  const root = document.getElementById("job-chart");
  if (!root || typeof uPlot === "undefined") return;
  const url = root.dataset.url;
  const POLL_MS = 1000;
  const RATE_WINDOW_S = 4;  // throughput: samples over the last few seconds of polls
  const COLORS = ["#2f5fb3", "#c0612b", "#1f7a32", "#8a3ab9", "#a21c1c", "#0e8a8a", "#7a6a00"];
  const RUN_COLOR = "#2f5fb3";
  let runs = [];      // [{id, name, current, points: [[t, acc, loss, samples]]}]
  let live = [];      // [[t, samples_done]] read at each poll of the current run
  let shown = {};     // run id -> shown
  let plots = null;
  let target = null;
  let trainLoss = []; // [[t, training loss]] the agents reported for the current run

  const fmt = (digits) => (u, v) => (v == null ? "–" : v.toFixed(digits));
  const pct = (u, v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
  const rate = (u, v) => (v == null ? "–" : Math.round(v).toLocaleString() + "/s");
  const secs = (u, v) => (v == null ? "–" : v.toFixed(1) + " s");

  // The current run is always first (i = 0) and blue; the others take the next colours.
  function colorOf(i, run) { return run.current ? RUN_COLOR : COLORS[1 + ((i - 1) % (COLORS.length - 1))]; }

  function width() { return Math.max(240, root.querySelector(".charts").clientWidth >= 700 ? (root.querySelector(".charts").clientWidth - 13) / 2 : root.querySelector(".charts").clientWidth); }

  function opts(title, yLabel, series, valueFmt, yRange, tickFmt) {
    return {
      width: width(), height: 220, title: "",
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      scales: { x: { time: false }, y: yRange ? { range: yRange } : { auto: true } },
      axes: [
        { label: "seconds since start", size: 36, labelSize: 18 },
        Object.assign({ label: yLabel, size: 58, labelSize: 18, labelGap: 2 },
          tickFmt ? { values: (u, ticks) => ticks.map((t) => tickFmt(t)) } : {}),
      ],
      series: [{ label: "time", value: secs }].concat(series.map((s) => ({
        label: s.label, stroke: s.color, width: s.width || 1.5, dash: s.dash, show: s.show !== false,
        spanGaps: true, points: { show: s.points !== false, size: 4 }, value: valueFmt,
      }))),
    };
  }

  // Samples per second: between evaluations before this page opened, then over the polls.
  function throughput() {
    const cur = runs.find((r) => r.current);
    const xs = [], ys = [];
    const firstLive = live.length ? live[0][0] : Infinity;
    if (cur) {
      const p = cur.points;
      for (let i = 1; i < p.length; i++) {
        const dt = p[i][0] - p[i - 1][0];
        if (p[i][0] < firstLive && dt > 0) { xs.push(p[i][0]); ys.push((p[i][3] - p[i - 1][3]) / dt); }
      }
    }
    for (let i = 1; i < live.length; i++) {
      let j = i - 1;
      while (j > 0 && live[i][0] - live[j][0] < RATE_WINDOW_S) j--;
      const dt = live[i][0] - live[j][0];
      if (dt > 0) { xs.push(live[i][0]); ys.push((live[i][1] - live[j][1]) / dt); }
    }
    return [xs, ys];
  }

  function joined(column) {
    const tables = runs.map((r) => [r.points.map((p) => p[0]), r.points.map((p) => p[column])]);
    if (!tables.length || !tables.some((t) => t[0].length)) return null;
    return uPlot.join(tables.filter((t) => t[0].length));
  }

  // Test loss of each run, then the current run's training loss as the last series.
  function joinedLoss() {
    const tables = withPoints().map((r) => [r.points.map((p) => p[0]), r.points.map((p) => p[2])]);
    if (trainLoss.length) tables.push([trainLoss.map((p) => p[0]), trainLoss.map((p) => p[1])]);
    return tables.length ? uPlot.join(tables) : null;
  }

  function withPoints() { return runs.filter((r) => r.points.length); }

  let shape = "";
  // Rebuilds when the set of series changes; otherwise only the data, so hover survives.
  function update() {
    const tp = throughput();
    const key = [withPoints().map((r) => r.id).join(","), target, tp[0].length > 0, trainLoss.length > 0, width()].join("|");
    if (key !== shape || !plots) { shape = key; build(); return; }
    const acc = joined(1);
    if (acc && plots.acc) {
      if (target != null) acc.push(acc[0].map(() => target));
      plots.acc.setData(acc);
    }
    if (plots.loss) plots.loss.setData(joinedLoss());
    if (plots.rate) plots.rate.setData(tp);
    root.dataset.points = String(countPoints());
  }

  function build() {
    const box = root.querySelector(".charts");
    const acc = joined(1), loss = joinedLoss();
    const present = withPoints();
    const runSeries = (dash) => present.map((r, i) => ({
      label: r.current ? r.name + " (this run)" : r.name, color: colorOf(i, r), width: r.current ? 2 : 1.2,
      dash: r.current ? undefined : dash, show: shown[r.id] !== false,
    }));
    box.querySelectorAll(".plot").forEach((el) => { el.innerHTML = ""; });
    plots = {};
    if (acc) {
      const ser = runSeries([4, 3]);
      const data = acc;
      if (target != null) { ser.push({ label: "target", color: "#6b7385", dash: [6, 4], width: 1, points: false }); data.push(acc[0].map(() => target)); }
      plots.acc = new uPlot(opts("Test accuracy", "test accuracy", ser, pct, [0, 1], (t) => Math.round(100 * t) + "%"), data, box.querySelector("#plot-accuracy"));
    }
    if (loss) {
      const ser = runSeries([4, 3]).map((s) => Object.assign(s, { label: "test: " + s.label }));
      if (trainLoss.length) ser.push({ label: "training loss (this run)", color: "#8fb0e8", width: 1.2, points: trainLoss.length < 120 });
      plots.loss = new uPlot(opts("Loss", "loss", ser, fmt(4)), loss, box.querySelector("#plot-loss"));
    }
    const tp = throughput();
    if (tp[0].length) {
      plots.rate = new uPlot(opts("Throughput", "samples/s", [{ label: "samples/s", color: "#1f7a32", points: tp[0].length < 200 }], rate, null, (t) => (t >= 1000 ? t / 1000 + "k" : String(t))), tp, box.querySelector("#plot-throughput"));
    }
    root.dataset.points = String(countPoints());
    toggles();
  }

  function countPoints() {
    const cur = runs.find((r) => r.current);
    return (cur ? cur.points.length : 0) + throughput()[0].length + trainLoss.length;
  }

  function toggles() {
    const box = root.querySelector(".chart-runs");
    const others = withPoints().filter((r) => !r.current);
    box.hidden = !others.length;
    box.innerHTML = others.length ? "<span class=\"muted\">Compare runs on this dataset:</span>" : "";
    withPoints().forEach((r, i) => {
      if (r.current) return;
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox"${shown[r.id] !== false ? " checked" : ""}> <span class="swatch" style="background:${colorOf(i, r)}"></span>`;
      label.appendChild(document.createTextNode(r.name));
      label.querySelector("input").addEventListener("change", (ev) => {
        shown[r.id] = ev.target.checked;
        for (const p of [plots.acc, plots.loss]) if (p) p.setSeries(i + 1, { show: ev.target.checked });
      });
      box.appendChild(label);
    });
  }

  function numbers(data) {
    const cur = runs.find((r) => r.current);
    const last = cur && cur.points.length ? cur.points[cur.points.length - 1] : null;
    const parts = [];
    if (last) parts.push(`test accuracy ${(100 * last[1]).toFixed(1)}%`, `loss ${last[2].toFixed(4)}`);
    const tp = throughput();
    if (tp[1].length && data.status === "running") parts.push(`${Math.round(tp[1][tp[1].length - 1]).toLocaleString()} samples/s`);
    parts.push(`${data.samples_done.toLocaleString()} samples`, `${data.pushes_accepted} pushes accepted, ${data.pushes_rejected} rejected`);
    document.getElementById("numbers").textContent = parts.join(" · ");
  }

  let first = true;
  async function poll() {
    let data = null;
    try {
      data = await (await fetch(url + (first ? "?others=1" : ""), { headers: { Accept: "application/json" } })).json();
    } catch (e) { /* transient; try again */ }
    if (data) {
      target = data.target_accuracy;
      trainLoss = data.train_loss || [];
      const others = first ? data.runs.filter((r) => !r.current) : runs.filter((r) => !r.current);
      runs = data.runs.filter((r) => r.current).concat(others);
      first = false;
      if (data.now_s != null && data.status === "running") {
        if (!live.length || data.now_s > live[live.length - 1][0]) live.push([data.now_s, data.samples_done]);
      }
      update();
      numbers(data);
      if (data.status !== "running" && data.status !== "queued" && data.status !== "paused") return;
    }
    setTimeout(poll, POLL_MS);
  }
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(update, 150); });
  poll();
})();
