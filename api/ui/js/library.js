// Models and datasets: list, upload, delete; download every file of a model (each format it has).

import { api, download } from "./api.js";
import { ui } from "./ui.js";
import { clear, field, fmtBytes, fmtInt, fmtTime, h } from "./dom.js";
import { formatsTable } from "./report.js";

export function modelFiles(model) {
  const list = h("ul", { class: "files" }, model.files.map((name) => h("li", {},
    h("button", { type: "button", class: "link", "data-file": name,
      onclick: () => ui.attempt(async () => {
        await download(`/v1/models/${model.id}/files/${encodeURIComponent(name)}?redirect=false`, name);
        ui.status(`Downloading ${name}.`);
      }) }, `Download ${name}`))));
  return h("div", {}, list, formatsTable(model));
}

function uploadForm(title, fileLabel, accept, extraFields, send) {
  const file = h("input", { type: "file", name: "file", accept, required: true });
  const name = h("input", { type: "text", name: "name", maxlength: 200 });
  const form = h("form", { class: "card upload" }, h("h3", {}, title), h("div", { class: "grid" },
    field(fileLabel, file), field("Name (optional)", name), extraFields.map(([label, control]) => field(label, control))),
  h("button", { type: "submit" }, "Upload"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files[0]) return;
    const data = new FormData();
    data.append("file", file.files[0]);
    if (name.value.trim()) data.append("name", name.value.trim());
    for (const [, control] of extraFields) if (control.value) data.append(control.name, control.value);
    ui.clearError();
    ui.status(`Uploading ${file.files[0].name}…`);
    const made = await ui.attempt(() => send(data));
    if (made) {
      ui.status(`Uploaded ${made.name}.`);
      form.reset();
    }
  });
  return form;
}

function deleteButton(what, row, refresh) {
  return h("button", { type: "button", class: "danger", onclick: async () => {
    if (!window.confirm(`Delete ${what} ${row.name}?`)) return;
    const done = await ui.attempt(() => api(`/v1/${what}s/${row.id}`, { method: "DELETE" }));
    if (done !== undefined) { ui.status(`Deleted ${row.name}.`); refresh(); }
  } }, `Delete ${row.name}`);
}

export function renderModels(main) {
  const body = h("div", { id: "models" });
  async function refresh() {
    const page = await ui.attempt(() => api("/v1/models?limit=200"));
    if (!page) return;
    clear(body, page.items.length ? page.items.map((m) => h("article", { class: "card model", "data-model": m.id },
      h("h3", {}, m.name),
      h("p", { class: "muted" }, `${m.family} ×${m.scale} · ${fmtInt(m.params)} parameters · ${m.source} · ${fmtTime(m.created_at)}`
        + (m.metrics?.psnr ? ` · ${m.metrics.psnr.toFixed(2)} dB` : "")),
      modelFiles(m),
      m.source === "builtin" ? null : deleteButton("model", m, refresh))) : h("p", {}, "No models yet."));
  }
  const family = h("select", { name: "family" }, ["", "rlfn", "edsr", "swinir"].map((f) => h("option", { value: f }, f || "detect")));
  const scale = h("select", { name: "scale" }, ["", "2", "3", "4"].map((s) => h("option", { value: s }, s ? `×${s}` : "detect")));
  main.append(h("h2", {}, "Models"),
    uploadForm("Upload a checkpoint", "Checkpoint (.pth, .pt, .safetensors)", ".pth,.pt,.safetensors,.bin",
      [["Family", family], ["Scale", scale]],
      async (data) => { const made = await api("/v1/models", { method: "POST", form: data }); refresh(); return made; }),
    body);
  refresh();
  return () => {};
}

export function renderDatasets(main) {
  const body = h("tbody");
  async function refresh() {
    const page = await ui.attempt(() => api("/v1/datasets?limit=200"));
    if (!page) return;
    clear(body, page.items.map((d) => h("tr", { "data-dataset": d.id },
      h("td", {}, d.name), h("td", {}, d.kind), h("td", {}, fmtInt(d.image_count)), h("td", {}, fmtBytes(d.total_bytes)),
      h("td", {}, fmtTime(d.created_at)), h("td", {}, d.builtin ? "built in" : deleteButton("dataset", d, refresh)))));
  }
  const kind = h("select", { name: "kind" }, ["train", "eval"].map((k) => h("option", { value: k }, k)));
  main.append(h("h2", {}, "Datasets"),
    uploadForm("Upload images", "Archive of images (.zip, .tar, .tar.gz)", ".zip,.tar,.gz,.tgz", [["Kind", kind]],
      async (data) => { const made = await api("/v1/datasets", { method: "POST", form: data }); refresh(); return made; }),
    h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Kind", "Images", "Size", "Created", ""].map((t) => h("th", { scope: "col" }, t)))), body));
  refresh();
  return () => {};
}
