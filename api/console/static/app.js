// The console's entry: sign-in, hash routing (#/jobs, #/jobs/<id>, #/submit) and page lifecycle.
import { api, auth, ApiError } from "./api.js";
import { el } from "./util.js";
import { jobsPage } from "./jobs.js";
import { jobPage } from "./job.js";
import { submitPage } from "./submit.js";

const main = document.getElementById("main");
let cleanup = null;

function signInPage(message) {
  const input = el("input", { id: "api-key", type: "password", placeholder: "wl_…", autocomplete: "off", size: 48 });
  const error = el("p", { class: "error", id: "signin-error" }, message || "");
  const form = el("form", { id: "signin", class: "card narrow" },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Paste an API key (", el("code", {}, "welore keys create"),
      ", or the one `welore serve` printed on its first start). It is kept in this tab's session storage only."),
    el("label", { for: "api-key" }, "API key"), input,
    el("div", {}, el("button", { type: "submit" }, "Sign in")), error);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    try {
      await api("/v1/jobs?limit=1", { key });
      auth.set(key);
      location.hash = "#/jobs";
      route();
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401 ? `Not signed in: ${err.message}` : String(err.message || err);
    }
  });
  return form;
}

function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const nav = document.getElementById("nav");
  main.replaceChildren();
  if (!auth.get()) {
    nav.hidden = true;
    main.append(signInPage());
    return;
  }
  nav.hidden = false;
  const hash = location.hash || "#/jobs";
  const m = hash.match(/^#\/jobs\/([\w-]+)$/);
  let page;
  if (m) page = jobPage(m[1]);
  else if (hash.startsWith("#/submit")) page = submitPage();
  else page = jobsPage();
  main.append(page.node);
  cleanup = page.cleanup || null;
}

window.addEventListener("hashchange", route);
window.addEventListener("welore:unauthorized", (e) => {
  auth.clear();
  if (cleanup) { cleanup(); cleanup = null; }
  document.getElementById("nav").hidden = true;
  main.replaceChildren(signInPage(`Signed out: ${e.detail.message}`));
});
document.getElementById("signout").addEventListener("click", () => { auth.clear(); location.hash = "#/jobs"; route(); });
route();
