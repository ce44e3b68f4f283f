// Shared by every page: CSRF-carrying fetch, a progress indicator for work over a second,
// and the Models & ingest actions (upload, scan, retrain), which run as polled jobs.
"use strict";
const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function post(url, body, isJson) {
  const headers = { "X-CSRF-Token": csrf() };
  if (isJson) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method: "POST", headers, credentials: "same-origin",
    body: isJson ? JSON.stringify(body) : body,
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { detail: response.statusText }; }
  if (!response.ok) { const err = new Error(data.detail || response.statusText); err.status = response.status; throw err; }
  return data;
}

const progress = {
  timer: null,
  show(text, fraction) {
    const box = document.getElementById("progress");
    box.hidden = false;
    box.classList.toggle("busy", fraction === null);
    box.querySelector(".fill").style.width = fraction === null ? "" : `${Math.round(100 * fraction)}%`;
    box.querySelector(".text").textContent = text;
  },
  // only work that lasts over a second shows the bar
  later(text) { this.timer = setTimeout(() => this.show(text, null), 1000); },
  hide(after) { clearTimeout(this.timer); setTimeout(() => { document.getElementById("progress").hidden = true; }, after || 0); },
};

async function followJob(job, label) {
  progress.show(`${label}…`, null);
  for (;;) {
    const response = await fetch(`/api/jobs/${job.id}`);
    const state = await response.json();
    const fraction = state.total ? state.done / state.total : null;
    progress.show(`${label}: ${state.total ? `${state.done}/${state.total}` : "working"} · ${state.seconds} s`, fraction);
    if (state.state !== "running") {
      progress.show(`${label} ${state.state}: ${state.message}`, state.state === "done" ? 1 : 0);
      progress.hide(6000);
      return state;
    }
    await new Promise((r) => setTimeout(r, 700));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const upload = document.getElementById("upload");
  if (upload) upload.addEventListener("change", async () => {
    const files = Array.from(upload.files);
    let i = 0, flagged = 0, failed = [];
    for (const file of files) {
      progress.show(`uploading ${file.name} (${++i}/${files.length})`, (i - 1) / files.length);
      const body = new FormData(); body.append("image", file);
      try { const r = await post("/api/upload", body, false); flagged += r.is_defect ? 1 : 0; }
      catch (e) { failed.push(`${file.name}: ${e.message}`); }
    }
    progress.show(`${files.length - failed.length} uploaded, ${flagged} flagged${failed.length ? "; " + failed.join("; ") : ""}`, 1);
    progress.hide(8000);
  });
  for (const [id, url, label] of [["scan", "/api/scan", "scan"], ["retrain", "/api/retrain", "retrain"]]) {
    const button = document.getElementById(id);
    if (button) button.addEventListener("click", async () => {
      button.disabled = true;
      try { await followJob(await post(url, {}, true), label); location.reload(); }
      catch (e) { progress.show(`${label}: ${e.message}`, 0); progress.hide(8000); }
      finally { button.disabled = false; }
    });
  }
});
