// Review page: verdict keys (d / n / u), arrows for previous / next, heat-map opacity,
// a brush and eraser on a canvas over the image; everything saves with fetch, no reload.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("review");
  const imageId = root.dataset.image, inspectionId = root.dataset.inspection;
  let revision = parseInt(root.dataset.revision, 10);
  const status = document.getElementById("status");
  const canvas = document.getElementById("paint");
  const ctx = canvas.getContext("2d");
  const classInput = document.getElementById("defect-class");
  let tool = "brush", drawing = false, dirty = false, last = null;

  function say(html, isError) { status.innerHTML = html; status.classList.toggle("err", !!isError); }
  function markVerdict(v) {
    for (const b of document.querySelectorAll(".verdict")) b.classList.toggle("on", b.dataset.verdict === v);
  }
  const initial = status.querySelector(".badge");
  if (initial) markVerdict(initial.textContent);

  async function saveVerdict(verdict) {
    try {
      const r = await post(`/api/reviews/${imageId}`, { verdict, defect_class: classInput.value.trim(), revision }, true);
      revision = r.revision; markVerdict(r.verdict);
      say(`<span class="badge ${r.verdict}">${r.verdict}</span> saved (revision ${r.revision})`);
    } catch (e) { say(`not saved: ${e.message}`, true); }
  }
  for (const b of document.querySelectorAll(".verdict")) b.addEventListener("click", () => saveVerdict(b.dataset.verdict));

  // layers
  const heat = document.getElementById("heat"), outline = document.getElementById("outline");
  document.getElementById("opacity").addEventListener("input", (e) => { heat.style.opacity = e.target.value / 100; });
  document.getElementById("show-outline").addEventListener("change", (e) => { outline.style.display = e.target.checked ? "" : "none"; });

  // mask canvas: the corrected mask if there is one, else empty (Predicted loads the model's)
  function loadMask(url) {
    const img = new Image();
    img.onload = () => {
      const tmp = document.createElement("canvas"); tmp.width = canvas.width; tmp.height = canvas.height;
      const t = tmp.getContext("2d"); t.drawImage(img, 0, 0, canvas.width, canvas.height);
      const data = t.getImageData(0, 0, canvas.width, canvas.height);
      for (let i = 0; i < data.data.length; i += 4) {
        const on = data.data[i] > 127;
        data.data[i] = 0; data.data[i + 1] = 230; data.data[i + 2] = 255; data.data[i + 3] = on ? 255 : 0;
      }
      ctx.putImageData(data, 0, 0);
    };
    img.src = url + `?t=${Date.now()}`;
  }
  if (root.dataset.hasMask === "1") loadMask(`/files/review-mask/${imageId}.png`);
  document.getElementById("use-predicted").addEventListener("click", () => { loadMask(`/files/mask/${inspectionId}.png`); dirty = true; });
  document.getElementById("clear-mask").addEventListener("click", () => { ctx.clearRect(0, 0, canvas.width, canvas.height); dirty = true; });

  function setTool(t) {
    tool = t;
    document.getElementById("tool-brush").classList.toggle("on", t === "brush");
    document.getElementById("tool-eraser").classList.toggle("on", t === "eraser");
  }
  document.getElementById("tool-brush").addEventListener("click", () => setTool("brush"));
  document.getElementById("tool-eraser").addEventListener("click", () => setTool("eraser"));
  const size = document.getElementById("brush-size");

  function point(e) {
    const r = canvas.getBoundingClientRect();
    return { x: (e.clientX - r.left) * canvas.width / r.width, y: (e.clientY - r.top) * canvas.height / r.height };
  }
  function stroke(from, to) {
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = "rgb(0,230,255)"; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineWidth = Math.max(1, size.value * scale);
    ctx.beginPath(); ctx.moveTo(from.x, from.y); ctx.lineTo(to.x, to.y); ctx.stroke();
    dirty = true;
  }
  canvas.addEventListener("pointerdown", (e) => { drawing = true; last = point(e); stroke(last, last); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => { if (!drawing) return; const p = point(e); stroke(last, p); last = p; });
  const end = () => { drawing = false; };
  canvas.addEventListener("pointerup", end); canvas.addEventListener("pointercancel", end);

  async function saveMask() {
    const out = document.createElement("canvas"); out.width = canvas.width; out.height = canvas.height;
    const o = out.getContext("2d");
    const src = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const dst = o.createImageData(canvas.width, canvas.height);
    for (let i = 0; i < src.data.length; i += 4) {
      const v = src.data[i + 3] > 0 ? 255 : 0;
      dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v; dst.data[i + 3] = 255;
    }
    o.putImageData(dst, 0, 0);
    const blob = await new Promise((r) => out.toBlob(r, "image/png"));
    const body = new FormData(); body.append("mask", blob, "mask.png"); body.append("revision", String(revision));
    progress.later("saving the mask");
    try {
      const r = await post(`/api/reviews/${imageId}/mask`, body, false);
      revision = r.revision; dirty = false; markVerdict(r.verdict);
      say(`mask saved: ${r.mask_pixels} pixels (revision ${r.revision})`);
    } catch (e) { say(`mask not saved: ${e.message}`, true); }
    finally { progress.hide(); }
  }
  document.getElementById("save-mask").addEventListener("click", saveMask);

  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.target.type !== "range" && e.target.type !== "checkbox") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const go = (url) => { if (url) { if (dirty && !confirm("The mask has unsaved strokes. Leave?")) return; location.href = url; } };
    switch (e.key) {
      case "d": saveVerdict("defect"); break;
      case "n": saveVerdict("normal"); break;
      case "u": saveVerdict("unsure"); break;
      case "b": setTool("brush"); break;
      case "e": setTool("eraser"); break;
      case "s": saveMask(); break;
      case "ArrowRight": go(root.dataset.next); break;
      case "ArrowLeft": go(root.dataset.prev); break;
      default: return;
    }
    e.preventDefault();
  });
});
