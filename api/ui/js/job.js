// One job: live progress from its event stream (stage, fraction, ETA), loss and validation PSNR curves
// drawn as points arrive, the log, and once it succeeded the report, plots, before/after and "try it".

import { api, download, followEvents, objectUrl } from "./api.js";
import { ui } from "./ui.js";
import { LiveChart } from "./charts.js";
import { renderCompare, renderTryIt } from "./compare.js";
import { clear, fmtSeconds, fmtTime, h } from "./dom.js";
import { ACTIVE, cancelJob, progressBar } from "./jobs.js";
import { modelFiles } from "./library.js";
import { renderReport } from "./report.js";

const PLOTS = ["learning_curve.png", "psnr_vs_params.png", "crops.png"];

function eventLine(event) {
  const metrics = event.metrics || {};
  const parts = [event.state];
  if (event.stage && event.stage !== event.state) parts.push(`(${event.stage})`);
  if (event.fraction !== null && event.fraction !== undefined && ACTIVE.includes(event.state)) {
    parts.push(`${Math.round(event.fraction * 100)} %`);
  }
  if (event.message) parts.push(`— ${event.message}`);
  const figures = ["iteration", "total", "charbonnier", "density", "val_psnr", "eta_s"]
    .filter((k) => typeof metrics[k] === "number")
    .map((k) => `${k} ${Number(metrics[k]).toPrecision(k === "iteration" ? 6 : 4)}`);
  if (figures.length) parts.push(`[${figures.join(", ")}]`);
  return h("li", {}, h("time", { datetime: event.created_at }, new Date(event.created_at).toLocaleTimeString()), " ",
    parts.join(" "));
}

// The job's facts, built once and updated in place (a control never vanishes under the keyboard).
function summary() {
  const state = h("span", { id: "job-state" });
  const stage = h("span", { id: "job-stage" });
  const progress = h("progress", { max: 1, value: 0, "aria-label": "progress of the current stage" });
  const eta = h("span", { id: "job-eta" });
  const finished = h("span");
  const error = h("dd", { class: "error" });
  const errorTerm = h("dt", {}, "Error");
  const webhook = h("dd");
  const webhookTerm = h("dt", {}, "Webhook");
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel this job");
  let current = null;
  cancel.addEventListener("click", async () => {
    const answer = await cancelJob(current);
    if (answer) update(answer, null);
  });
  const node = h("div", {},
    h("dl", { class: "facts" },
      h("dt", {}, "State"), h("dd", {}, state),
      h("dt", {}, "Stage"), h("dd", {}, stage),
      h("dt", {}, "Progress of the stage"), h("dd", {}, progress),
      h("dt", {}, "ETA of the stage"), h("dd", {}, eta),
      h("dt", {}, "Finished"), h("dd", {}, finished),
      errorTerm, error, webhookTerm, webhook),
    cancel);
  function update(job, etaSeconds) {
    current = job;
    state.textContent = job.state;
    state.className = `state state-${job.state}`;
    stage.textContent = job.stage || "–";
    progress.value = job.state === "succeeded" ? 1 : job.progress || 0;
    eta.textContent = etaSeconds === null || etaSeconds === undefined ? "–" : fmtSeconds(etaSeconds);
    finished.textContent = fmtTime(job.finished_at);
    error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    error.hidden = errorTerm.hidden = !job.error;
    webhook.textContent = job.webhook_url || "";
    webhook.hidden = webhookTerm.hidden = !job.webhook_url;
    const canCancel = ACTIVE.includes(job.state) && !job.cancel_requested;
    if (!canCancel && document.activeElement === cancel) node.focus?.();
    cancel.hidden = !canCancel;
  }
  return { node, update };
}

export function renderJob(main, jobId) {
  const controller = new AbortController();
  const urls = [];
  let job = null;
  let eta = null;
  const heading = h("h2", { id: "job-title" }, `Job ${jobId.slice(0, 8)}`);
  const facts = summary();
  const summarySlot = h("div", { class: "card" }, facts.node);
  const charts = {
    prune: new LiveChart("Pruning loss (Charbonnier)", "iteration", "loss"),
    distill: new LiveChart("Distillation loss", "iteration", "loss"),
    psnr: new LiveChart("Validation PSNR (held-out images)", "iteration", "PSNR (dB)"),
  };
  const log = h("ol", { class: "log", id: "job-log" });
  const results = h("div", { id: "job-results" });
  main.append(h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")), heading, summarySlot,
    h("section", { "aria-labelledby": "curves-title" }, h("h3", { id: "curves-title" }, "Curves"),
      h("div", { class: "charts", id: "charts" }, Object.values(charts).map((c) => c.node))),
    results,
    h("section", { "aria-labelledby": "log-title" }, h("h3", { id: "log-title" }, "Log"), log));

  const show = () => { if (job) facts.update(job, eta); };

  function onEvent(event) {
    log.append(eventLine(event));
    const m = event.metrics || {};
    if (typeof m.eta_s === "number") eta = m.eta_s;
    if (event.state === "pruning" && typeof m.charbonnier === "number") charts.prune.add("charbonnier", m.iteration, m.charbonnier);
    if (event.state === "distilling" && typeof m.total === "number") charts.distill.add("total", m.iteration, m.total);
    if (typeof m.val_psnr === "number") charts.psnr.add("student", m.iteration, m.val_psnr);
    if (job && !m.webhook) {
      job = { ...job, state: event.state, stage: event.stage ?? job.stage, progress: event.fraction ?? job.progress };
      if (event.message === "cancel requested") job.cancel_requested = true;
      show();
    }
  }

  async function showResults() {
    const report = await api(`/v1/jobs/${jobId}/report`, { signal: controller.signal });
    // The report holds every point: the curves are complete even where events were sampled.
    for (const p of report.prune?.curve || []) charts.prune.add("charbonnier", p.iteration, p.charbonnier);
    for (const p of report.distill?.loss_curve || []) charts.distill.add("total", p.iteration, p.total);
    for (const p of report.distill?.val_curve || []) charts.psnr.add("student", p.iteration, p.psnr);
    const model = job.result_model_id ? await api(`/v1/models/${job.result_model_id}`, { signal: controller.signal }) : null;
    const artifacts = await api(`/v1/jobs/${jobId}/artifacts`, { signal: controller.signal });
    const plots = h("div", { class: "plots" });
    for (const name of PLOTS) {
      const artifact = artifacts.find((a) => a.name === name);
      if (!artifact) continue;
      const url = await objectUrl(artifact.url, controller.signal);
      urls.push(url);
      plots.append(h("figure", {}, h("img", { src: url, alt: `${name} of job ${jobId.slice(0, 8)}`, "data-artifact": name }),
        h("figcaption", {}, name)));
    }
    clear(results,
      renderReport(report, model),
      h("section", { "aria-labelledby": "plots-title" }, h("h3", { id: "plots-title" }, "Plots"), plots),
      renderCompare(jobId, controller.signal, urls),
      model ? renderTryIt(model, urls) : null,
      model ? h("section", { "aria-labelledby": "files-title" }, h("h3", { id: "files-title" }, "Download the compact model"),
        modelFiles(model)) : null,
      h("section", { "aria-labelledby": "artifacts-title" }, h("h3", { id: "artifacts-title" }, "Artifacts"),
        h("ul", {}, artifacts.map((a) => h("li", {}, h("button", { type: "button", class: "link",
          onclick: () => ui.attempt(() => download(a.url, a.name)) }, a.name))))));
  }

  (async () => {
    job = await ui.attempt(() => api(`/v1/jobs/${jobId}`, { signal: controller.signal }));
    if (!job) return;
    heading.textContent = `Job ${jobId.slice(0, 8)}: ${job.config.model} ×${job.config.scale}`;
    show();
    await ui.attempt(() => followEvents(jobId, onEvent, controller.signal));
    if (controller.signal.aborted) return;
    job = await ui.attempt(() => api(`/v1/jobs/${jobId}`, { signal: controller.signal }));
    if (!job) return;
    eta = null;
    show();
    ui.status(`Job ${jobId.slice(0, 8)} ${job.state}.`);
    if (job.state === "succeeded") await ui.attempt(showResults);
  })();

  return () => {
    controller.abort();
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
