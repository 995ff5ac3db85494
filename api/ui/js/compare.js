// Before/after: a slider over the same crop of a held-out image in two views (bicubic, teacher,
// student, ground truth); and "try it": an image of the user's upscaled by the student beside bicubic.

import { api, objectUrl } from "./api.js";
import { ui } from "./ui.js";
import { field, h } from "./dom.js";

const VIEW_NAMES = { bicubic: "bicubic", teacher: "teacher", student: "student", gt: "ground truth" };

export function renderCompare(jobId, signal, urls) {
  const section = h("section", { "aria-labelledby": "compare-title", id: "compare" },
    h("h3", { id: "compare-title" }, "Before / after"));
  const image = h("select", { name: "image" });
  const left = h("select", { name: "left" });
  const right = h("select", { name: "right" });
  const slider = h("input", { type: "range", min: 0, max: 100, value: 50, step: 1, name: "divider", id: "divider" });
  const leftImg = h("img", { alt: "", class: "left" });
  const rightImg = h("img", { alt: "", class: "right" });
  const clip = h("div", { class: "clip" }, leftImg);
  const caption = h("figcaption", { "aria-live": "polite" });
  const viewer = h("figure", { class: "compare-viewer" }, h("div", { class: "stack" }, rightImg, clip,
    h("div", { class: "divider", "aria-hidden": "true" })), caption);
  const cache = new Map();
  let crops = null;

  const place = () => {
    viewer.style.setProperty("--split", `${slider.value}%`);
    viewer.dataset.split = slider.value;
    slider.setAttribute("aria-valuetext", `${slider.value} % ${VIEW_NAMES[left.value]}, the rest ${VIEW_NAMES[right.value]}`);
  };
  async function url(path) {
    if (!cache.has(path)) {
      const made = objectUrl(path, signal).then((u) => { urls.push(u); return u; });
      cache.set(path, made);
      made.catch(() => cache.delete(path));
    }
    return cache.get(path);
  }
  async function show() {
    const item = crops.images[Number(image.value)];
    const [l, r] = await Promise.all([url(item.views[left.value]), url(item.views[right.value])]);
    leftImg.src = l;
    rightImg.src = r;
    leftImg.alt = `${item.name}: ${VIEW_NAMES[left.value]} (left of the divider)`;
    rightImg.alt = `${item.name}: ${VIEW_NAMES[right.value]} (right of the divider)`;
    caption.textContent = `${item.name}: ${VIEW_NAMES[left.value]} | ${VIEW_NAMES[right.value]}`;
    viewer.dataset.loaded = `${image.value}:${left.value}:${right.value}`;
    place();
  }
  slider.addEventListener("input", place);
  for (const control of [image, left, right]) control.addEventListener("change", () => ui.attempt(show));

  ui.attempt(async () => {
    crops = await api(`/v1/jobs/${jobId}/crops`, { signal });
    if (!crops.images.length) {
      section.append(h("p", { class: "muted" }, "This job held out no training images (a single-image training set)."));
      return;
    }
    image.append(...crops.images.map((item) => h("option", { value: item.index }, item.name)));
    for (const [select, chosen] of [[left, "bicubic"], [right, "student"]]) {
      select.append(...crops.views.map((v) => h("option", { value: v, selected: v === chosen }, VIEW_NAMES[v] || v)));
    }
    section.append(
      h("div", { class: "grid" }, field("Held-out image", image), field("Left of the divider", left),
        field("Right of the divider", right), field("Divider position", slider)),
      viewer);
    await show();
  });
  return section;
}

export function renderTryIt(model, urls) {
  const input = h("input", { type: "file", accept: "image/*", name: "try-file", class: "visually-hidden-file" });
  const zone = h("div", { class: "drop-zone", id: "drop-zone" },
    field("Image to upscale: drop it here, or choose a file", input));
  const out = h("div", { class: "try-results", "aria-live": "polite" });

  async function upscale(file) {
    ui.clearError();
    out.replaceChildren(h("p", { class: "muted" }, `Upscaling ${file.name}…`));
    const form = (extra) => {
      const data = new FormData();
      data.append("file", file, file.name);
      for (const [k, v] of Object.entries(extra)) data.append(k, v);
      return data;
    };
    const [student, bicubic] = await Promise.all([
      api("/v1/upscale", { method: "POST", form: form({ model_id: model.id, format: "png" }) }),
      api("/v1/bicubic", { method: "POST", form: form({ scale: model.scale }) }),
    ]);
    const studentUrl = URL.createObjectURL(student);
    const bicubicUrl = URL.createObjectURL(bicubic);
    urls.push(studentUrl, bicubicUrl);
    const stem = file.name.replace(/\.[^.]+$/, "");
    out.replaceChildren(
      h("figure", {}, h("img", { src: bicubicUrl, alt: `${file.name} upscaled ×${model.scale} with bicubic` }),
        h("figcaption", {}, `bicubic ×${model.scale}`)),
      h("figure", {}, h("img", { src: studentUrl, alt: `${file.name} upscaled ×${model.scale} by ${model.name}`, id: "try-student" }),
        h("figcaption", {}, `student (${model.name})`)),
      h("p", {}, h("a", { href: studentUrl, download: `${stem}-x${model.scale}.png`, id: "try-download" },
        `Download ${stem}-x${model.scale}.png`)));
  }
  const take = (file) => { if (file) ui.attempt(() => upscale(file)); };
  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    take(event.dataTransfer.files[0]);
  });
  return h("section", { "aria-labelledby": "try-title", id: "try-it" }, h("h3", { id: "try-title" }, "Try it"),
    h("p", { class: "muted" }, `Upscale an image of your own ×${model.scale} with the student, beside bicubic.`),
    zone, out);
}
