// Jobs table: status, type, model, progress, created; filters; refreshed every 2 s while shown.
import { api } from "./api.js";
import { el, fmtTime, progressBar, statusBadge } from "./util.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const TYPES = ["", "compress", "finetune", "evaluate"];

export function jobsPage() {
  const status = el("select", { id: "filter-status" }, STATUSES.map((s) => el("option", { value: s }, s || "any status")));
  const type = el("select", { id: "filter-type" }, TYPES.map((t) => el("option", { value: t }, t || "any type")));
  const body = el("tbody", { id: "jobs-body" });
  const more = el("button", { type: "button", class: "link", hidden: true }, "Load more");
  const note = el("p", { class: "muted" });
  let pages = 1;
  let timer = null;

  async function load() {
    const rows = [];
    let after = null, cursor = null;
    try {
      for (let i = 0; i < pages; i++) {
        const q = new URLSearchParams({ limit: "25" });
        if (status.value) q.set("status", status.value);
        if (type.value) q.set("type", type.value);
        if (after) q.set("after", after);
        const page = await api(`/v1/jobs?${q}`);
        rows.push(...page.data);
        cursor = page.next_cursor;
        if (!cursor) break;
        after = cursor;
      }
      note.textContent = rows.length ? "" : "No jobs yet: submit one.";
    } catch (e) {
      note.textContent = `Could not load jobs: ${e.message}`;
      return;
    }
    more.hidden = !cursor;
    body.replaceChildren(...rows.map((j) => el("tr", { "data-job": j.id },
      el("td", {}, el("a", { href: `#/jobs/${j.id}` }, j.id)),
      el("td", {}, statusBadge(j.status)),
      el("td", {}, j.type),
      el("td", { class: "model" }, j.model),
      el("td", {}, progressBar(j.progress), j.stage && j.status === "running" ? el("span", { class: "muted" }, ` ${j.stage}`) : ""),
      el("td", {}, fmtTime(j.created_at)))));
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => { await load(); schedule(); }, 2000);
  }

  for (const s of [status, type]) s.addEventListener("change", () => { pages = 1; load(); });
  more.addEventListener("click", () => { pages += 1; load(); });
  load().then(schedule);

  const node = el("section", {},
    el("div", { class: "row" }, el("h1", {}, "Jobs"), el("a", { class: "button", href: "#/submit" }, "Submit a job")),
    el("div", { class: "filters" }, el("label", {}, "Status ", status), el("label", {}, "Type ", type)),
    el("table", { class: "jobs" },
      el("thead", {}, el("tr", {}, ["Job", "Status", "Type", "Model", "Progress", "Created"].map((h) => el("th", {}, h)))),
      body),
    note, more);
  return { node, cleanup: () => clearTimeout(timer) };
}
