// The dashboard's shell: the API key form, the alert/status lines and the hash router
// (#/jobs, #/jobs/<id>, #/models, #/datasets). Each view returns a function that stops it.

import { api, forgetKey, getKey, setKey } from "./api.js";
import { renderJob } from "./job.js";
import { renderJobs } from "./jobs.js";
import { renderDatasets, renderModels } from "./library.js";
import { ui } from "./ui.js";

const main = document.getElementById("main");
const keyInput = document.getElementById("api-key");
const keyState = document.getElementById("key-state");
let stopView = () => {};

function showKeyState(ok) {
  keyState.textContent = ok ? "key in use" : getKey() ? "key not accepted" : "no key";
  document.body.dataset.key = ok ? "ok" : "missing";
}

async function useKey(key) {
  setKey(key);
  ui.clearError();
  try {
    await api("/v1/jobs?limit=1");
  } catch (error) {
    ui.error(error.message);
    if (error.status === 401) forgetKey();
    showKeyState(false);
    return;
  }
  keyInput.value = "";
  showKeyState(true);
  ui.status("API key accepted.");
  route();
}

function route() {
  stopView();
  stopView = () => {};
  const [, section = "jobs", id] = (location.hash || "#/jobs").split("/");
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.replaceChildren();
  if (!getKey()) {
    main.append(Object.assign(document.createElement("p"), {
      className: "hint",
      textContent: "Enter an API key above to see your jobs, models and datasets. "
        + "Create one with: srcompress keys create NAME",
    }));
    keyInput.focus();
    return;
  }
  const views = { jobs: id ? (m) => renderJob(m, id) : renderJobs, models: renderModels, datasets: renderDatasets };
  stopView = (views[section] || renderJobs)(main) || (() => {});
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (key) useKey(key);
});
document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  showKeyState(false);
  ui.status("API key forgotten.");
  route();
});
window.addEventListener("hashchange", () => {
  ui.clearError();
  route();
  main.focus({ preventScroll: true });
});

ui.onRejectedKey(() => showKeyState(false));
showKeyState(Boolean(getKey()));
route();
