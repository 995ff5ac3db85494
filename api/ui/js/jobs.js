// The jobs view: submit a job, list the key's jobs with state, stage and progress, filter, cancel.

import { api } from "./api.js";
import { ui } from "./ui.js";
import { clear, field, fmtTime, h } from "./dom.js";

export const ACTIVE = ["queued", "preparing", "pruning", "compressing", "distilling", "evaluating",
  "exporting", "quantizing"];
const FILTERS = [["", "all"], [ACTIVE.join(","), "unfinished"], ["succeeded", "succeeded"],
  ["failed", "failed"], ["canceled", "canceled"]];
const REFRESH_MS = 3000;

export function progressBar(job, label) {
  const value = job.state === "succeeded" ? 1 : job.progress || 0;
  return h("progress", { max: 1, value, "aria-label": label, title: `${Math.round(value * 100)} %` });
}

export async function cancelJob(job) {
  const canceled = await ui.attempt(() => api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }));
  if (canceled) ui.status(`Job ${job.id.slice(0, 8)}: ${canceled.state === "canceled" ? "canceled" : "cancel requested"}.`);
  return canceled;
}

function jobRow(job, refresh) {
  const short = job.id.slice(0, 8);
  const active = ACTIVE.includes(job.state);
  return h("tr", { "data-job": job.id, "data-state": job.state },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, `${job.config.model || "job"} ×${job.config.scale || "?"} · ${short}`)),
    h("td", {}, h("span", { class: `state state-${job.state}` }, job.state)),
    h("td", {}, job.stage || "–"),
    h("td", {}, progressBar(job, `progress of job ${short}`)),
    h("td", {}, fmtTime(job.created_at)),
    h("td", {}, active && !job.cancel_requested
      ? h("button", { type: "button", class: "danger", onclick: async () => { await cancelJob(job); refresh(); } },
        `Cancel ${short}`)
      : job.cancel_requested && active ? "cancel requested" : ""));
}

// Put `rows` in `body`, keeping the rows that did not change where they are (a focused button stays
// focused while the list refreshes).
function syncRows(body, rows) {
  const keep = new Set(rows);
  for (const child of [...body.children]) if (!keep.has(child)) child.remove();
  let cursor = body.firstElementChild;
  for (const row of rows) {
    if (row === cursor) cursor = cursor.nextElementSibling;
    else body.insertBefore(row, cursor);
  }
}

function advancedDefaults() {
  return JSON.stringify({ target_params: 45000, budget_minutes: 4 }, null, 1);
}

// The key's webhook signing secret is shown once: a new one replaces the old at once.
function secretRotation() {
  const shown = h("output", { class: "secret", "aria-live": "polite" });
  const button = h("button", { type: "button", onclick: async () => {
    if (!window.confirm("Replace this key's webhook signing secret? Receivers must switch to the new one.")) return;
    const made = await ui.attempt(() => api("/v1/webhooks/secret", { method: "POST" }));
    if (made) shown.textContent = `New secret (shown only now): ${made.secret}`;
  } }, "New webhook signing secret");
  return h("details", { class: "secret-rotation" }, h("summary", {}, "Webhook signing secret"),
    h("p", { class: "muted" }, "Webhooks are signed with HMAC-SHA256 under your key's secret "
      + "(Srcompress-Signature, Srcompress-Timestamp headers)."), button, " ", shown);
}

async function submitForm(onSubmitted) {
  const [models, datasets, presets] = await Promise.all([
    api("/v1/models?limit=200"), api("/v1/datasets?limit=200"), api("/v1/presets"),
  ]);
  const teacher = h("select", { name: "teacher", required: true },
    models.items.map((m) => h("option", { value: m.id, "data-family": m.family, "data-scale": m.scale, "data-params": m.params },
      `${m.name} (${m.family} ×${m.scale}, ${m.source})`)));
  const presetNames = [...new Set(presets.map((p) => p.name))];
  const preset = h("select", { name: "model", required: true },
    presetNames.map((name) => h("option", { value: name }, name)));
  const scale = h("select", { name: "scale" }, [2, 3, 4].map((s) => h("option", { value: s }, `×${s}`)));
  const datasetOptions = () => datasets.items.map((d) => h("option", { value: d.id }, `${d.name} (${d.image_count} images)`));
  const train = h("select", { name: "train" }, datasetOptions());
  const val = h("select", { name: "val" }, datasetOptions());
  const recipe = h("select", { name: "recipe" }, ["fast", "paper"].map((r) => h("option", { value: r }, r)));
  const advanced = h("textarea", { name: "advanced", rows: 4, spellcheck: "false" }, advancedDefaults());
  const webhook = h("input", { name: "webhook", type: "url", placeholder: "https://example.com/hooks/srcompress" });

  const syncTeacher = () => {
    const option = teacher.selectedOptions[0];
    if (!option) return;
    scale.value = option.dataset.scale;
    // The preset of the teacher's architecture: same family and scale, and the same size when one has it.
    const fits = presets.filter((p) => p.family === option.dataset.family && String(p.scale) === option.dataset.scale);
    const match = fits.find((p) => String(p.params) === option.dataset.params) || fits[0];
    if (match) preset.value = match.name;
  };
  teacher.addEventListener("change", syncTeacher);
  syncTeacher();

  const form = h("form", { class: "submit-job", "aria-labelledby": "submit-title" },
    h("h2", { id: "submit-title" }, "Submit a compression job"),
    h("div", { class: "grid" },
      field("Teacher model", teacher),
      field("Preset of the teacher", preset),
      field("Scale", scale),
      field("Recipe", recipe),
      field("Training dataset", train),
      field("Validation dataset", val)),
    field("More parameters (JSON: any field of the job, e.g. target_params, budget_minutes, distill_iters)",
      advanced),
    field("Webhook URL (optional)", webhook, "POSTed on start, each stage, success, failure and cancellation"),
    h("button", { type: "submit" }, "Submit job"),
    secretRotation());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let extra = {};
    try {
      extra = advanced.value.trim() ? JSON.parse(advanced.value) : {};
    } catch (error) {
      ui.error(`More parameters is not valid JSON: ${error.message}`);
      advanced.focus();
      return;
    }
    const body = {
      model: preset.value, scale: Number(scale.value), recipe: recipe.value, teacher_model_id: teacher.value,
      train_dataset_ids: [train.value], val_dataset_ids: [val.value], ...extra,
    };
    if (webhook.value.trim()) body.webhook_url = webhook.value.trim();
    ui.clearError();
    const job = await ui.attempt(() => api("/v1/jobs", { method: "POST", json: body }));
    if (job) {
      ui.status(`Job ${job.id.slice(0, 8)} submitted (${job.state}).`);
      onSubmitted(job);
    }
  });
  if (!models.items.length) {
    form.prepend(h("p", { class: "hint" }, "Upload a teacher model first (Models)."));
  }
  return form;
}

export function renderJobs(main) {
  let timer = null;
  let stopped = false;
  const filter = h("select", { name: "state" }, FILTERS.map(([value, text]) => h("option", { value }, text)));
  const body = h("tbody");
  const listTitle = h("h2", { id: "jobs-title" }, "Jobs");
  const count = h("p", { class: "muted", "aria-live": "polite" });
  const list = h("section", { "aria-labelledby": "jobs-title" }, listTitle,
    h("div", { class: "toolbar" }, field("Show jobs", filter), count),
    h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "State", "Stage", "Progress", "Created", ""].map((t) => h("th", { scope: "col" }, t)))),
      body));
  const formSlot = h("section", { class: "card" }, h("p", { class: "muted" }, "Loading the submit form…"));

  async function refresh() {
    clearTimeout(timer);
    const state = filter.value ? `&state=${encodeURIComponent(filter.value)}` : "";
    const page = await ui.attempt(() => api(`/v1/jobs?limit=50${state}`));
    if (stopped) return;
    if (page) {
      syncRows(body, page.items.map((job) => {
        const signature = `${job.state}|${job.stage}|${job.progress}|${job.cancel_requested}`;
        const old = [...body.children].find((row) => row.dataset.job === job.id);
        if (old && old.dataset.signature === signature) return old;
        const row = jobRow(job, refresh);
        row.dataset.signature = signature;
        return row;
      }));
      count.textContent = `${page.total} job(s)`;
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }
  filter.addEventListener("change", refresh);
  main.append(formSlot, list);
  ui.attempt(async () => {
    const form = await submitForm((job) => { location.hash = `#/jobs/${job.id}`; });
    if (!stopped) clear(formSlot, form);
  });
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
