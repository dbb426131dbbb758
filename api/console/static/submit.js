// Submit forms for compress, finetune and evaluate, built from the API's own OpenAPI schema of each
// job type's `params` (so they follow the server's recipe), with uploads and models to choose from.
// A 422 puts each field's message next to that field.
import { api, ApiError } from "./api.js";
import { el } from "./util.js";

const TYPES = ["compress", "finetune", "evaluate"];
const DATASET_FIELDS = ["data", "calibration"];  // name a dataset: a file id or a built-in name
const MODEL_FIELDS = ["teacher"];                // name a model, like `model`
const randomKey = () => (crypto.randomUUID ? crypto.randomUUID()  // secure contexts only; else 128 random bits
  : [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join(""));
const SCHEMA_NAME = { compress: "CompressJobCreate", finetune: "FinetuneJobCreate", evaluate: "EvaluateJobCreate" };

function resolve(spec, schema) {
  if (schema && schema.$ref) return resolve(spec, spec.components.schemas[schema.$ref.split("/").pop()]);
  return schema || {};
}

// {type, enum, nullable, min, max, exclusiveMin/Max, default, description, object} of a property.
function describe(spec, prop) {
  const p = resolve(spec, prop);
  const variants = p.anyOf ? p.anyOf.map((v) => resolve(spec, v)) : [p];
  const real = variants.filter((v) => v.type !== "null");
  const v = real[0] || {};
  return {
    type: v.type || (v.properties ? "object" : "string"), object: v.properties ? v : null,
    enum: v.enum ?? (v.const !== undefined ? [v.const] : undefined),  // a one-choice option is a `const`
    nullable: variants.length > real.length, default: p.default ?? v.default, description: p.description || v.description || "",
    min: v.minimum ?? v.exclusiveMinimum, max: v.maximum ?? v.exclusiveMaximum,
    exMin: v.exclusiveMinimum !== undefined, exMax: v.exclusiveMaximum !== undefined, title: p.title || v.title,
  };
}

function rangeText(d) {
  const lo = d.min !== undefined ? `${d.min} ${d.exMin ? "<" : "≤"} ` : "";
  const hi = d.max !== undefined ? ` ${d.exMax ? "<" : "≤"} ${d.max}` : "";
  return lo || hi ? `${lo}value${hi}` : "";
}

function widget(path, d, lists) {
  const name = path.split(".").pop();
  const attrs = { name: path, id: `f-${path}`, "data-field": `params.${path}` };
  if (d.enum) {
    // A nullable choice left at "(default)" is not sent: the server's config applies its default (shown in the help).
    const opts = (d.nullable || d.default === undefined ? [el("option", { value: "" }, "(default)")] : [])
      .concat(d.enum.map((x) => el("option", { value: x, selected: !d.nullable && x === d.default }, x)));
    return el("select", attrs, opts);
  }
  if (d.type === "boolean") {
    if (d.nullable) return el("select", { ...attrs, "data-kind": "bool" }, el("option", { value: "" }, "(default)"), el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false"));
    return el("input", { ...attrs, type: "checkbox", checked: d.default === true });
  }
  if (d.type === "number" || d.type === "integer") {
    return el("input", { ...attrs, type: "number", step: d.type === "integer" ? "1" : "any", "data-kind": d.type,
      placeholder: d.default !== undefined && d.default !== null ? String(d.default) : "", min: d.min, max: d.max });
  }
  const list = DATASET_FIELDS.includes(name) ? "datasets" : MODEL_FIELDS.includes(name) ? "models" : null;
  return el("input", { ...attrs, type: "text", list, placeholder: d.default ?? "" , size: 30 });
}

function fields(spec, schema, prefix, lists) {
  const s = resolve(spec, schema);
  const required = s.required || [];
  return Object.entries(s.properties || {}).map(([key, prop]) => {
    const path = prefix ? `${prefix}.${key}` : key;
    const d = describe(spec, prop);
    if (d.object) {
      return el("fieldset", { class: "nested", "data-group": path }, el("legend", {}, key), fields(spec, d.object, path, lists));
    }
    const help = [d.description, rangeText(d)].filter(Boolean).join(" · ");
    return el("div", { class: "field" },
      el("label", { for: `f-${path}` }, key, required.includes(key) ? el("span", { class: "req" }, " *") : ""),
      widget(path, d, lists),
      help ? el("small", { class: "help" }, help) : "",
      el("div", { class: "field-error", "data-error-for": `params.${path}` }));
  });
}

function collect(form) {
  const params = {};
  for (const input of form.querySelectorAll("[data-field^='params.']")) {
    const path = input.name.split(".");
    let value;
    if (input.type === "checkbox") value = input.checked;
    else if (input.value === "") continue;
    else if (input.dataset.kind === "bool") value = input.value === "true";
    else if (input.dataset.kind === "number" || input.dataset.kind === "integer") value = Number(input.value);
    else value = input.value;
    let obj = params;
    for (const k of path.slice(0, -1)) obj = obj[k] = obj[k] || {};
    obj[path[path.length - 1]] = value;
  }
  return params;
}

function showErrors(form, err) {
  const general = form.querySelector(".form-error");
  const fieldsList = err instanceof ApiError ? err.fields : [];
  let placed = 0;
  for (const f of fieldsList) {
    const box = form.querySelector(`[data-error-for="${CSS.escape(f.field)}"]`);
    if (!box) continue;
    box.textContent = f.message + (f.allowed ? ` (allowed: ${f.allowed})` : "") + (f.received !== undefined ? ` — received ${JSON.stringify(f.received)}` : "");
    box.closest(".field")?.classList.add("invalid");
    placed++;
  }
  if (!placed || placed < fieldsList.length) general.textContent = err.message;
}

export function submitPage() {
  const node = el("section", {}, el("h1", {}, "Submit a job"), el("p", { class: "muted" }, "Loading the parameter schema…"));
  const tabs = el("div", { class: "tabs" });
  Promise.all([fetch("/openapi.json").then((r) => r.json()), api("/v1/models"), api("/v1/datasets")]).then(([spec, models, datasets]) => {
    const lists = [
      el("datalist", { id: "models" }, models.data.filter((m) => m.available).map((m) => el("option", { value: m.id }, m.source === "job" ? `${m.type} of ${m.base_model}` : m.source))),
      el("datalist", { id: "datasets" }, datasets.data.map((d) => el("option", { value: d.id }, d.source === "upload" ? `${d.filename} (${d.records} records)` : "built-in"))),
    ];
    const forms = {};
    for (const type of TYPES) {
      const schema = spec.components.schemas[SCHEMA_NAME[type]];
      const model = el("input", { name: "model", id: `model-${type}`, list: "models", required: true, size: 30, "data-field": "model", value: models.data[0]?.id || "" });
      const upload = el("input", { type: "file", accept: ".jsonl,.txt", id: `upload-${type}` });
      const uploadNote = el("small", { class: "help" });
      upload.addEventListener("change", async () => {
        if (!upload.files.length) return;
        const fd = new FormData();
        fd.append("file", upload.files[0]);
        uploadNote.textContent = "uploading…";
        try {
          const f = await api("/v1/files", { method: "POST", body: fd });
          uploadNote.textContent = `uploaded ${f.filename} as ${f.id} (${f.records} records): choose it as a dataset`;
          lists[1].append(el("option", { value: f.id }, `${f.filename} (${f.records} records)`));
        } catch (e) { uploadNote.textContent = `upload refused: ${e.message}`; }
      });
      const form = el("form", { class: "card submit", id: `form-${type}`, novalidate: true, hidden: type !== "compress" },
        el("p", { class: "muted" }, resolve(spec, schema.properties.params).description || ""),
        el("div", { class: "field" }, el("label", { for: `model-${type}` }, "model", el("span", { class: "req" }, " *")), model,
          el("small", { class: "help" }, "a registry name, one of your finished jobs, or a folder under the models directory"),
          el("div", { class: "field-error", "data-error-for": "model" })),
        el("div", { class: "grid" }, fields(spec, schema.properties.params, "", lists)),
        el("div", { class: "field" }, el("label", {}, "upload a dataset (.jsonl / .txt)"), upload, uploadNote),
        el("p", { class: "error form-error" }),
        el("button", { type: "submit" }, `Submit ${type}`));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        form.querySelectorAll(".field-error").forEach((b) => { b.textContent = ""; });
        form.querySelectorAll(".invalid").forEach((b) => b.classList.remove("invalid"));
        form.querySelector(".form-error").textContent = "";
        try {
          const job = await api("/v1/jobs", { method: "POST", body: { type, model: model.value.trim(), params: collect(form) },
            headers: { "Idempotency-Key": randomKey() } });
          location.hash = `#/jobs/${job.id}`;
        } catch (err) { showErrors(form, err); }
      });
      forms[type] = form;
      tabs.append(el("button", { type: "button", "data-tab": type, class: type === "compress" ? "active" : "",
        onclick: (ev) => {
          for (const t of TYPES) forms[t].hidden = t !== type;
          tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b === ev.currentTarget));
        } }, type));
    }
    node.replaceChildren(el("h1", {}, "Submit a job"), ...lists, tabs, ...TYPES.map((t) => forms[t]));
  }).catch((e) => node.append(el("p", { class: "error" }, `Could not build the forms: ${e.message}`)));
  return { node };
}
