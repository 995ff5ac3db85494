// A succeeded job's report: density, computed vs chosen config, params/MACs/latency before -> after,
// student - teacher per validation set, the time budget plan, and the model's exported formats.
// Figures the report or model does not carry (yet) are left out rather than shown empty.

import { fmtBytes, fmtInt, fmtNum, fmtSeconds, h, table } from "./dom.js";

const triple = (t) => (Array.isArray(t) ? `(${t.join(", ")})` : t && typeof t === "object" ? `(${t.nc}, ${t.nl}, ${t.nb})` : "–");

// "3.2× smaller" / "1.4× larger" (or faster / slower): the factor is always at least 1.
function ratio(before, after, better = "smaller", worse = "larger") {
  if (!before || !after) return "";
  return before >= after ? `${(before / after).toFixed(1)}× ${better}` : `${(after / before).toFixed(1)}× ${worse}`;
}

function beforeAfter(report) {
  const { teacher, student } = report;
  const latency = ratio(teacher.latency_ms, student.latency_ms, "faster", "slower");
  return table(["", "teacher", "student", ""], [
    ["parameters", fmtInt(teacher.params), fmtInt(student.params), ratio(teacher.params, student.params)],
    [`MACs at ${teacher.lr_size?.join("×") || "?"} LR`, `${fmtNum(teacher.macs / 1e9, 2)} G`, `${fmtNum(student.macs / 1e9, 2)} G`,
      ratio(teacher.macs, student.macs)],
    ["latency", teacher.latency_ms ? `${fmtNum(teacher.latency_ms, 1)} ms` : "–",
      student.latency_ms ? `${fmtNum(student.latency_ms, 1)} ms` : "–", latency],
  ], "Before → after");
}

function configs(report) {
  const compress = report.compress || {};
  const rule = compress.budget?.rule || compress.rule || {};
  const rows = [
    ["density d of the pruned teacher", fmtNum(report.prune?.density ?? compress.pruned_density, 4)],
    ["d used by the rule", fmtNum(rule.d, 4)],
    ["computed (N_c, N_l, N_b), unrounded", `(${fmtNum(rule.raw_c, 2)}, ${fmtNum(rule.raw_l, 2)}, ${fmtNum(rule.raw_b, 2)})`],
    ["computed, rounded", triple(rule.triple)],
    ["chosen (N_c, N_l, N_b)", triple(compress.chosen)],
  ];
  if (compress.override) rows.push(["override", triple(compress.override)]);
  if (compress.note) rows.push(["note", compress.note]);
  if (report.pruning_ineffective) rows.push(["pruning", "ineffective: the teacher did not get sparser"]);
  return table(["", ""], rows, "Compression");
}

function gaps(report) {
  if (!report.gaps?.length) return null;
  return table(["validation set", "bicubic", "teacher", "student", "student − teacher", "chosen on"],
    report.gaps.map((g) => [g.dataset, fmtNum(g.bicubic), fmtNum(g.teacher), fmtNum(g.student),
      h("strong", {}, `${g.student_minus_teacher >= 0 ? "+" : ""}${fmtNum(g.student_minus_teacher)} dB`),
      g.used_for_selection ? "yes (held out)" : ""]),
    "PSNR (dB, Y channel) per validation set");
}

function budget(report) {
  const b = report.budget;
  if (!b) return null;
  return table(["", ""], [
    ["time budget", fmtSeconds(b.budget_seconds)],
    ["pruning iterations", fmtInt(b.prune_iters)],
    ["distillation iterations", fmtInt(b.distill_iters)],
    ["one distillation step", `${fmtNum(b.distill_step_seconds * 1000, 1)} ms`],
    ["validations", fmtInt(b.validations)],
  ], "Budget plan");
}

export function formatsTable(model) {
  if (!model?.formats?.length) return null;
  return table(["format", "precision", "runtime", "file", "size", "parity (dB)", "quality cost (dB)", "PSNR", "SSIM", "latency"],
    model.formats.map((f) => [f.name, f.precision, f.runtime, f.file, fmtBytes(f.bytes), fmtNum(f.parity_db, 3),
      fmtNum(f.quality_cost_db, 3), fmtNum(f.psnr), fmtNum(f.ssim, 4), f.latency_ms ? `${fmtNum(f.latency_ms, 1)} ms` : "–"]),
    "Exported formats");
}

export function renderReport(report, model) {
  const distill = report.distill || {};
  return h("section", { "aria-labelledby": "report-title", id: "report" },
    h("h3", { id: "report-title" }, "Report"),
    h("div", { class: "report-grid" }, configs(report), beforeAfter(report), gaps(report), budget(report),
      table(["", ""], [
        ["recipe", report.recipe?.name ?? report.params?.recipe ?? "–"],
        ["distillation", `${fmtInt(distill.iterations)} iterations, best at ${fmtInt(distill.best_iteration)}`
          + (distill.best_psnr ? ` (${fmtNum(distill.best_psnr)} dB on ${distill.validation_set})` : "")],
        ["stage times", Object.entries(report.stage_seconds || {}).map(([k, v]) => `${k} ${fmtSeconds(v)}`).join(", ")],
      ], "Run")),
    formatsTable(model),
    h("details", {}, h("summary", {}, "The whole report (JSON)"), h("pre", {}, JSON.stringify(report, null, 1))));
}
