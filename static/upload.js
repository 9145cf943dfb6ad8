/* Upload page: a zip (dropped or picked) or a folder (dropped or picked), sent as multipart with
   XMLHttpRequest so that the upload progress can be shown. */
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
    if (maxBytes && size > maxBytes) {
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
})();
