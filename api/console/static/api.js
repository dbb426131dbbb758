// The REST API from the browser: the key lives in sessionStorage only (gone when the tab closes).
// SSE is read with fetch() and a stream reader, because EventSource cannot send an Authorization header.

const KEY = "welore.apiKey";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || `http_${status}`;
    this.fields = err.fields || [];
  }
}

export async function api(path, { method = "GET", body, headers = {}, key = auth.get() } = {}) {
  const h = { ...headers };
  if (key) h["Authorization"] = `Bearer ${key}`;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: h, body: payload });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) {
    const e = new ApiError(r.status, data);
    if (r.status === 401 && key) window.dispatchEvent(new CustomEvent("welore:unauthorized", { detail: e }));
    throw e;
  }
  return data;
}

function parseBlock(block) {
  let id = null, event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id") id = value;
  }
  return data.length ? { id, event, data: data.join("\n") } : null;
}

// Follow a job's events until it ends; reconnects with Last-Event-ID. Returns when the job ended
// or `signal` aborted.
export async function followEvents(jobId, onEvent, signal) {
  let last = null;
  for (let failures = 0; !signal.aborted; ) {
    const headers = { Authorization: `Bearer ${auth.get()}`, Accept: "text/event-stream" };
    if (last !== null) headers["Last-Event-ID"] = String(last);
    let ended = false;
    try {
      const r = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal });
      if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const msg = parseBlock(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
          if (!msg) continue;
          const ev = JSON.parse(msg.data);
          if (last !== null && ev.seq <= last) continue;
          last = ev.seq;
          failures = 0;
          onEvent(ev);
          if (ev.type === "status" && ["succeeded", "failed", "cancelled"].includes(ev.data.status)) ended = true;
        }
      }
      if (ended) return;
      const job = await api(`/v1/jobs/${jobId}`);
      if (["succeeded", "failed", "cancelled"].includes(job.status)) return;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status < 500) throw e;
      failures += 1;
    }
    await new Promise((res) => setTimeout(res, Math.min(500 * 2 ** failures, 8000)));
  }
}
