/* Upload page. A small zip (dropped or picked) is sent in one multipart request (XMLHttpRequest, for the
   progress). A folder (dropped or picked) is packed here into zip parts of about data-part-bytes each
   (client-zip, static/vendor/client-zip.js), one part in memory at a time, and each part is sent as a
   resumable tus upload (tus-js-client, static/vendor/tus.min.js): a dropped connection is retried from the
   server's offset, a reload resumes an unfinished part (tus-js-client remembers it by fingerprint) and skips
   the parts already sent (remembered in localStorage). A large zip is sent the same way, as one part. Then
   one POST /api/v1/datasets {"uploads": [ids]} makes the dataset of the parts. */
"use strict";
(() => {
  const form = document.getElementById("upload-form");
  const zone = document.getElementById("dropzone");
  const zipInput = document.getElementById("zip-input");
  const folderInput = document.getElementById("folder-input");
  const picked = document.getElementById("picked");
  const btn = document.getElementById("upload-btn");
  const errBox = document.getElementById("upload-error");
  const progress = document.getElementById("upload-progress");
  const bar = document.getElementById("upload-bar");
  const barText = document.getElementById("upload-text");
  const nameInput = document.getElementById("ds-name");
  const maxBytes = Number(form.dataset.maxBytes || 0);
  // read when the upload starts (a test lowers it); at least 1 MB
  const partBytes = () => Math.max(1 << 20, Number(form.dataset.partBytes || 100 * 1024 * 1024));
  const CHUNK = 8 << 20;  // PATCH bodies stream to disk on the server (the upload limit applies, not 1 MiB)

  let zip = null;        // a File
  let files = null;      // [{file, path}]
  let busy = false;

  const skip = (path) => path.split("/").some((p) => p.startsWith(".") || p === "__MACOSX" || p === "Thumbs.db");

  function setZip(f) {
    Graft.hide(errBox);
    if (!/\.zip$/i.test(f.name)) { Graft.show(errBox, `${f.name} is not a .zip file: zip the dataset folder, or pick the folder itself.`); return; }
    zip = f; files = null;
    nameInput.placeholder = f.name.replace(/\.zip$/i, "");
    describe();
  }

  function setFiles(list) {
    Graft.hide(errBox);
    const kept = list.filter((x) => x.path && !skip(x.path));
    if (!kept.length) { Graft.show(errBox, "That folder holds no files to upload."); return; }
    files = kept; zip = null;
    nameInput.placeholder = kept[0].path.split("/")[0];
    describe();
  }

  function total() { return zip ? zip.size : (files || []).reduce((n, x) => n + x.file.size, 0); }

  function describe() {
    const size = total();
    picked.textContent = zip ? `Zip file: ${zip.name} (${Graft.bytes(size)})`
      : `Folder: ${nameInput.placeholder}/, ${files.length} files (${Graft.bytes(size)})`;
    picked.hidden = false;
    btn.disabled = false;
    if (zip && maxBytes && size > maxBytes) {
      Graft.show(errBox, `This is ${Graft.bytes(size)}, more than the server accepts (${Graft.bytes(maxBytes)}).`);
      btn.disabled = true;
    }
  }

  zipInput.addEventListener("change", () => { if (zipInput.files.length) setZip(zipInput.files[0]); zipInput.value = ""; });
  folderInput.addEventListener("change", () => {
    setFiles(Array.from(folderInput.files).map((f) => ({ file: f, path: f.webkitRelativePath || f.name })));
    folderInput.value = "";
  });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); zipInput.click(); } });

  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("dragover")));
  // a file dropped next to the zone must not replace the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  /* All files under a dropped directory entry, with paths relative to its parent. */
  function readAll(entry) {
    return new Promise((resolve, reject) => {
      if (entry.isFile) {
        entry.file((f) => resolve([{ file: f, path: entry.fullPath.replace(/^\/+/, "") }]), reject);
        return;
      }
      const reader = entry.createReader();
      const out = [];
      const next = () => reader.readEntries(async (batch) => {
        if (!batch.length) {
          try { resolve((await Promise.all(out.map(readAll))).flat()); } catch (e) { reject(e); }
          return;
        }
        out.push(...batch.filter((x) => !skip(x.name)));
        next();
      }, reject);
      next();
    });
  }

  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    if (busy) return;
    const items = Array.from(e.dataTransfer.items || []);
    const entries = items.map((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()).filter(Boolean);
    const dirs = entries.filter((x) => x.isDirectory);
    if (dirs.length) {
      if (dirs.length > 1 || entries.length > 1) { Graft.show(errBox, "Drop one folder (or one .zip) at a time."); return; }
      picked.textContent = "Reading the folder…"; picked.hidden = false;
      try { setFiles(await readAll(dirs[0])); } catch (err) { Graft.show(errBox, `Could not read the folder: ${err.message || err}`); }
      return;
    }
    const dropped = Array.from(e.dataTransfer.files || []);
    if (dropped.length !== 1) { Graft.show(errBox, "Drop one .zip file or one folder."); return; }
    setZip(dropped[0]);
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (busy || (!zip && !files)) return;
    Graft.hide(errBox);
    if (files || zip.size > partBytes()) { resumable(); return; }
    const data = new FormData();
    const name = nameInput.value.trim();
    if (name) data.append("name", name);
    const ws = document.getElementById("ds-workspace");
    if (ws && ws.value) data.append("workspace_id", ws.value);
    if (zip) data.append("file", zip, zip.name);
    else files.forEach((x) => data.append("files", x.file, x.path));

    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/datasets");
    xhr.setRequestHeader("X-CSRF-Token", Graft.csrf());
    xhr.setRequestHeader("Accept", "application/json");
    busy = true; btn.disabled = true; progress.hidden = false;
    bar.style.width = "0%"; barText.textContent = "Starting…";
    xhr.upload.onprogress = (ev) => {
      if (!ev.lengthComputable) { barText.textContent = `Uploading: ${Graft.bytes(ev.loaded)}`; return; }
      const p = ev.loaded / ev.total;
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      barText.textContent = `Uploading: ${Graft.bytes(ev.loaded)} of ${Graft.bytes(ev.total)} (${Math.round(100 * p)}%)`;
    };
    xhr.upload.onload = () => {
      bar.style.width = "100%";
      barText.textContent = "Uploaded. The server is unpacking and checking the images…";
    };
    const fail = (msg) => {
      busy = false; btn.disabled = false; progress.hidden = true;
      Graft.show(errBox, msg);
    };
    xhr.onload = () => {
      if (xhr.status === 201) {
        try {
          const ds = JSON.parse(xhr.responseText);
          barText.textContent = "Done. Opening the dataset…";
          window.location.href = `/datasets/${ds.id}`;
          return;
        } catch (err) { /* fall through */ }
      }
      fail(Graft.errorMessage(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => fail(Graft.errorMessage(0, ""));
    xhr.send(data);
  });

  /* ------------------------------------------------------------ the resumable path (tus, in parts) */

  const fail2 = (msg) => {
    busy = false; btn.disabled = false; progress.hidden = true;
    Graft.show(errBox, msg);
  };

  /* Consecutive files grouped into parts of at most `limit` bytes (a larger file makes a part alone). */
  function planParts(list, limit) {
    const parts = []; let cur = []; let size = 0;
    for (const x of list) {
      if (cur.length && size + x.file.size > limit) { parts.push(cur); cur = []; size = 0; }
      cur.push(x); size += x.file.size;
    }
    if (cur.length) parts.push(cur);
    return parts;
  }

  /* The same folder gives the same key (and, zipped again, the same bytes: client-zip stores the files
     with their own dates), so a retry can skip the parts already sent and resume the unfinished one. */
  function folderKey(list, limit) {
    let h = 0;
    const text = list.map((x) => `${x.path}:${x.file.size}:${x.file.lastModified}`).join("|") + `|${limit}`;
    for (let i = 0; i < text.length; i++) h = (Math.imul(h, 31) + text.charCodeAt(i)) | 0;
    return `${list.length}-${(h >>> 0).toString(16)}`;
  }

  const store = {
    get(key) { try { return JSON.parse(localStorage.getItem(`graft-parts:${key}`) || "{}"); } catch (e) { return {}; } },
    set(key, v) { try { localStorage.setItem(`graft-parts:${key}`, JSON.stringify(v)); } catch (e) { /* private mode */ } },
    clear(key) { try { localStorage.removeItem(`graft-parts:${key}`); } catch (e) { /* ignore */ } },
  };

  async function isFinished(id) {
    try {
      const r = await fetch(`/api/v1/uploads/${id}`, { method: "HEAD", headers: { "Tus-Resumable": "1.0.0" } });
      return r.ok && r.headers.get("Upload-Offset") === r.headers.get("Upload-Length");
    } catch (e) { return false; }
  }

  function sendPart(blob, name, fingerprint, onProgress) {
    return new Promise((resolve, reject) => {
      const up = new tus.Upload(blob, {
        endpoint: "/api/v1/uploads",
        chunkSize: CHUNK,
        retryDelays: [0, 1000, 3000, 5000, 10000, 20000, 30000, 60000],
        metadata: { filename: name, filetype: "application/zip" },
        headers: { "X-CSRF-Token": Graft.csrf() },
        fingerprint: () => Promise.resolve(fingerprint),
        storeFingerprintForResuming: true,
        removeFingerprintOnSuccess: true,
        onProgress,
        onSuccess: () => resolve(up.url.split("/").pop()),
        onError: (err) => reject(err),
      });
      up.findPreviousUploads().then((prev) => {
        if (prev.length) up.resumeFromPreviousUpload(prev[0]);
        up.start();
      }, reject);
    });
  }

  function tusMessage(err) {
    const r = err && err.originalResponse;
    if (r && r.getStatus && r.getStatus()) return Graft.errorMessage(r.getStatus(), r.getBody() || "");
    return `The upload stopped: ${(err && err.message) || err}. Pick the same folder again to resume it.`;
  }

  async function resumable() {
    const limit = partBytes();
    const list = files ? files : [{ file: zip, path: zip.name }];
    const plan = files ? planParts(list, limit) : [list];
    const key = folderKey(list, limit);
    const done = store.get(key);  // part index -> upload id
    const totalBytes = list.reduce((n, x) => n + x.file.size, 0);
    const name = nameInput.value.trim() || nameInput.placeholder;
    const ws = document.getElementById("ds-workspace");
    busy = true; btn.disabled = true; progress.hidden = false;
    bar.style.width = "0%"; barText.textContent = "Starting…";
    const started = Date.now();
    let sentNow = 0;      // bytes sent in this session (for the speed)
    let bytesBefore = 0;  // file bytes of the parts before the current one
    let filesBefore = 0;
    const show = (i, partFiles, partSize, frac) => {
      const bytesDone = bytesBefore + frac * partSize;
      const filesDone = filesBefore + Math.floor(frac * partFiles);
      const p = totalBytes ? bytesDone / totalBytes : 1;
      const secs = (Date.now() - started) / 1000;
      const speed = secs > 0.5 ? sentNow / secs : 0;
      const left = speed > 0 ? (totalBytes - bytesDone) / speed : null;
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      barText.textContent = `Uploading part ${i + 1} of ${plan.length}: ${Graft.bytes(bytesDone)} of ` +
        `${Graft.bytes(totalBytes)} (${Math.round(100 * p)}%), ${filesDone} of ${list.length} files` +
        (speed ? `, ${Graft.bytes(speed)}/s` : "") +
        (left !== null ? `, about ${Graft.duration ? Graft.duration(left) : `${Math.round(left)} s`} left` : "");
    };
    const ids = [];
    try {
      const { downloadZip } = files ? await import("/static/vendor/client-zip.js") : {};
      for (let i = 0; i < plan.length; i++) {
        const part = plan[i];
        const partSize = part.reduce((n, x) => n + x.file.size, 0);
        if (done[i] && await isFinished(done[i])) {
          ids.push(done[i]);
        } else {
          barText.textContent = files ? `Packing part ${i + 1} of ${plan.length}…` : "Starting…";
          // one part in memory at a time: packed, sent, then let go
          const blob = files ? await downloadZip(part.map((x) => ({ name: x.path, lastModified: x.file.lastModified,
                                                                      input: x.file }))).blob() : zip;
          let last = 0;
          const id = await sendPart(blob, files ? `part-${i + 1}-of-${plan.length}.zip` : zip.name,
            `graft-${key}-${i}-${blob.size}`, (sent, total) => {
              sentNow += Math.max(0, sent - last); last = sent;
              show(i, part.length, partSize, total ? sent / total : 1);
            });
          ids.push(id);
          done[i] = id; store.set(key, done);
        }
        bytesBefore += partSize; filesBefore += part.length;
        show(i, 0, 0, 1);
      }
    } catch (err) {
      fail2(tusMessage(err));
      return;
    }
    bar.style.width = "100%";
    barText.textContent = `Uploaded ${list.length} files in ${plan.length} part${plan.length > 1 ? "s" : ""}. ` +
      "The server is unpacking and checking the images…";
    const body = { name, uploads: ids };
    if (ws && ws.value) body.workspace_id = Number(ws.value);
    try {
      const ds = await Graft.api("POST", "/api/v1/datasets", body);
      store.clear(key);
      barText.textContent = "Done. Opening the dataset…";
      window.location.href = `/datasets/${ds.id}`;
    } catch (err) {
      if (err.status) store.clear(key);  // refused: the server deleted or never had the parts
      fail2(err.message);
    }
  }
})();
