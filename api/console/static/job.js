// One job: status and progress live over SSE, the event log, metric charts, the result, the rank
// map and spectra of a compress job, artifacts with signed download links, cancel.
import { api, followEvents } from "./api.js";
import { MetricCharts, spectrumChart } from "./charts.js";
import { el, fmtBytes, fmtTime, fmtValue, kvTable, progressBar, statusBadge, TERMINAL } from "./util.js";

function rankMap(report, onPick) {
  const byKey = new Map(report.matrices.map((m) => [`${m.layer}/${m.matrix}`, m]));
  const color = (f) => `hsl(215, 75%, ${96 - 56 * f}%)`;
  const rows = report.layers.map((layer) => el("tr", {},
    el("th", {}, `layer ${layer}`),
    report.matrix_types.map((t) => {
      const m = byKey.get(`${layer}/${t}`);
      if (!m) return el("td", { class: "empty" });
      const f = m.kept_fraction ?? 1;
      return el("td", {
        class: `cell ${m.label === "LRC" ? "lrc" : "nlrc"}`, style: `background:${color(f)};color:${f > 0.55 ? "#fff" : "#111"}`,
        title: `${m.name}\nkept ${m.kept_rank} / ${m.rank} ranks (${(100 * f).toFixed(1)}%)\n${m.label}, ${m.storage}` +
          (m.rel_error != null ? `\n‖W−Ŵ‖/‖W‖ = ${m.rel_error.toFixed(4)}` : ""),
        "data-matrix": m.name, onclick: () => onPick(m),
      }, `${Math.round(100 * f)}%`, el("small", {}, m.label === "LRC" ? "LRC" : "N-LRC"));
    })));
  return el("table", { class: "rankmap", id: "rank-map" },
    el("thead", {}, el("tr", {}, el("th", {}, ""), report.matrix_types.map((t) => el("th", {}, t)))),
    el("tbody", {}, rows));
}

export function jobPage(id) {
  const ctrl = new AbortController();
  const head = el("div", { class: "job-head" });
  const resultBox = el("div", { id: "result" });
  const chartsBox = el("div", { class: "charts", id: "charts" });
  const reportBox = el("div", { id: "report" });
  const artifactsBox = el("div", { id: "artifacts" });
  const log = el("tbody", { id: "event-log" });
  const charts = new MetricCharts(chartsBox);
  let job = null, t0 = null, finishedLoaded = false;

  function renderHead() {
    const cancel = el("button", { type: "button", id: "cancel", class: "danger", hidden: TERMINAL.includes(job.status) }, "Cancel");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try { job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); renderHead(); }
      catch (e) { alert(e.message); cancel.disabled = false; }
    });
    head.replaceChildren(
      el("div", { class: "row" }, el("h1", {}, `${job.type} `, el("code", {}, job.id)), cancel),
      el("p", {}, statusBadge(job.status), " ", progressBar(job.progress), " ",
        el("span", { id: "stage", class: "muted" }, job.stage ? `stage ${job.stage}` : ""),
        job.cancel_requested && !TERMINAL.includes(job.status) ? el("span", { class: "muted" }, " (cancel requested)") : ""),
      el("p", { class: "muted" }, `model ${job.model} · created ${fmtTime(job.created_at)}` +
        (job.started_at ? ` · started ${fmtTime(job.started_at)}` : "") + (job.finished_at ? ` · finished ${fmtTime(job.finished_at)}` : "")),
      job.error ? el("p", { class: "error" }, `${job.error.code}: ${job.error.message}`) : "",
      el("details", {}, el("summary", {}, "params"), kvTable(job.params)));
  }

  async function loadFinished() {
    if (finishedLoaded) return;
    finishedLoaded = true;
    job = await api(`/v1/jobs/${id}`);
    renderHead();
    if (job.result) resultBox.replaceChildren(el("h2", {}, "Result"), kvTable(job.result));
    if (job.status !== "succeeded") return;
    const arts = await api(`/v1/jobs/${id}/artifacts`);
    artifactsBox.replaceChildren(el("h2", {}, "Artifacts"), el("table", { class: "artifacts" },
      el("thead", {}, el("tr", {}, ["File", "Size", "SHA-256", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, arts.data.map((a) => el("tr", {},
        el("td", {}, a.name), el("td", {}, fmtBytes(a.size)), el("td", {}, el("code", { class: "sha" }, a.sha256)),
        el("td", {}, el("button", { type: "button", class: "link", "data-download": a.name, onclick: () => download(a.name) }, "download")))))));
    if (job.type === "compress" || job.type === "finetune") {
      try {
        const report = await api(`/v1/jobs/${id}/report`);
        const spec = el("div", { class: "chart spectrum", id: "spectrum" });
        const s = report.summary;
        reportBox.replaceChildren(el("h2", {}, "Rank map"),
          el("p", { class: "muted" }, `τ = ${fmtValue(report.tau)} · ERR ${fmtValue(s.err_achieved)} · parameters kept ${fmtValue(s.params_kept_achieved)} · ${s.n_lrc} LRC / ${s.n_nlrc} N-LRC · cell = kept-rank fraction; click a cell for its spectrum`),
          rankMap(report, (m) => spectrumChart(spec, m, report.tau)), spec);
        const first = report.matrices.find((m) => m.label === "LRC") || report.matrices[0];
        if (first) spectrumChart(spec, first, report.tau);
      } catch (e) {
        reportBox.replaceChildren(el("p", { class: "muted" }, `No per-matrix report: ${e.message}`));
      }
    }
  }

  async function download(name) {
    const link = await api(`/v1/jobs/${id}/links`, { method: "POST", body: { name } });
    const a = el("a", { href: link.url, download: name.split("/").pop() });
    document.body.append(a);
    a.click();
    a.remove();
  }

  function onEvent(e) {
    const d = e.data || {};
    const t = new Date(e.time).getTime() / 1000;
    if (t0 === null) t0 = t;
    let text = "";
    if (e.type === "status") { job.status = d.status; text = d.status + (d.error ? ` ${d.error.code}: ${d.error.message}` : ""); }
    else if (e.type === "progress") {
      job.stage = d.stage; job.progress = Math.max(job.progress, d.progress || 0);
      text = `${d.stage} ${d.done ?? ""}${d.total ? "/" + d.total : ""}${d.message ? " " + d.message : ""}`;
    } else if (e.type === "metric") {
      charts.add(t - t0, d.values || {});
      text = Object.entries(d.values || {}).map(([k, v]) => `${k}=${fmtValue(v)}`).join(" ");
    } else text = d.message || JSON.stringify(d);
    log.prepend(el("tr", { class: `ev-${e.type}` }, el("td", {}, e.seq), el("td", {}, fmtTime(e.time)), el("td", {}, e.type), el("td", {}, text)));
    if (e.type !== "metric") renderHead();
    if (e.type === "status" && TERMINAL.includes(d.status)) loadFinished().catch((err) => console.error(err));
  }

  const node = el("section", { class: "job" }, head,
    el("p", {}, el("a", { href: "#/jobs" }, "← all jobs")),
    resultBox, el("h2", {}, "Metrics"), chartsBox, reportBox, artifactsBox,
    el("h2", {}, "Events"), el("div", { class: "log" }, el("table", { class: "events" },
      el("thead", {}, el("tr", {}, ["#", "time", "type", ""].map((h) => el("th", {}, h)))), log)));

  api(`/v1/jobs/${id}`).then((j) => {
    job = j;
    renderHead();
    return followEvents(id, onEvent, ctrl.signal);
  }).then(() => { if (!ctrl.signal.aborted) return loadFinished(); })
    .catch((e) => { if (!ctrl.signal.aborted) head.append(el("p", { class: "error" }, `Could not load job ${id}: ${e.message}`)); });
  return { node, cleanup: () => { ctrl.abort(); charts.destroy(); } };
}
