// janus-server playground: plain JavaScript, no framework, no build step. It calls this server only:
// GET /ready, POST /understand (multipart, streamed) and POST /generate (JSON, streamed).
"use strict";

(() => {
  const KEY_STORAGE = "janus-playground:api-key";
  const $ = (id) => document.getElementById(id);

  // ---- API key: typed in once, kept in this tab's sessionStorage, sent as a bearer token ----

  const keyInput = $("api-key");

  function loadKey() {
    try {
      keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (err) {
      // storage disabled: the key then lives in the field only
    }
  }

  function saveKey() {
    const key = keyInput.value.trim();
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (err) {
      // storage disabled
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = keyInput.value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  keyInput.addEventListener("input", saveKey);
  $("key-form").addEventListener("submit", (event) => event.preventDefault());
  $("api-key-clear").addEventListener("click", () => {
    keyInput.value = "";
    saveKey();
    keyInput.focus();
  });

  // ---- errors: status + message, whatever failed ----

  function showError(box, heading, error) {
    box.textContent = "";
    const strong = document.createElement("strong");
    strong.textContent = heading;
    box.append(strong, document.createTextNode(error.message || "(no message)"));
    const details = [];
    if (error.type) details.push("type: " + error.type);
    if (error.code) details.push("code: " + error.code);
    if (error.param) details.push("param: " + error.param);
    if (details.length) {
      const small = document.createElement("div");
      small.className = "small";
      small.textContent = details.join(" · ");
      box.append(small);
    }
    box.hidden = false;
  }

  function clearError(box) {
    box.hidden = true;
    box.textContent = "";
  }

  /** The {message, type, code, param} of a failed response, whatever its body is. */
  async function errorOf(response) {
    let text = "";
    try {
      text = await response.text();
    } catch (err) {
      return { message: "The response body could not be read: " + err.message };
    }
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "object" && body.error !== null) return body.error;
      if (body && typeof body.error === "string") return { message: body.error };
      if (body && body.detail) return { message: JSON.stringify(body.detail) };
    } catch (err) {
      // not JSON: show the start of the text
    }
    return { message: text.trim().slice(0, 500) || response.statusText || "(empty body)" };
  }

  function statusHeading(response) {
    return "HTTP " + response.status + (response.statusText ? " " + response.statusText : "") + ": ";
  }

  // ---- Server-Sent Events over fetch(): a ReadableStream reader, `data:` lines ----

  /** Calls onEvent(text) with the data of each event of the response body, in order. */
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const dispatch = (block) => {
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data && data !== "[DONE]") onEvent(data);
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) dispatch(buffer);
  }

  /** JSON.parse, keeping seeds (up to 2**63 - 1, past JavaScript's exact integers) as strings. */
  function parseEvent(text) {
    return JSON.parse(text.replace(/"seed":\s*(\d+)/g, '"seed":"$1"'));
  }

  function seconds(value) {
    return typeof value === "number" ? value.toFixed(2) + " s" : "–";
  }

  // ---- tabs (WAI-ARIA tabs pattern; #understand / #generate in the address) ----

  const tabs = [$("tab-understand"), $("tab-generate")];

  function selectTab(tab, focus) {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    const hash = "#" + tab.id.replace("tab-", "");
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab, false));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      selectTab(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
    });
  });

  function tabFromHash() {
    const tab = $("tab-" + location.hash.slice(1));
    if (tabs.includes(tab)) selectTab(tab, false);
  }

  window.addEventListener("hashchange", tabFromHash);

  // ---- the served model (GET /ready needs no key) ----

  async function showModel() {
    const line = $("model-line");
    try {
      const response = await fetch("/ready");
      const body = await response.json();
      if (response.ok) line.textContent = "Model: " + body.model + " (ready).";
      else line.textContent = "Model not ready: " + ((body.error && body.error.message) || response.status);
    } catch (err) {
      line.textContent = "The server did not answer /ready: " + err.message;
    }
  }

  // ---- understanding: images + question -> streamed text ----

  const files = [];
  const thumbs = $("thumbs");
  const fileInput = $("images");
  const dropZone = $("drop-zone");

  function renderThumbs() {
    for (const img of thumbs.querySelectorAll("img")) URL.revokeObjectURL(img.src);
    thumbs.textContent = "";
    files.forEach((file, index) => {
      const item = document.createElement("li");
      item.dataset.testid = "thumb";
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = "";
      const name = document.createElement("span");
      name.textContent = file.name + " (" + Math.max(1, Math.round(file.size / 1024)) + " KB)";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "secondary";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", "Remove " + file.name);
      remove.addEventListener("click", () => {
        files.splice(index, 1);
        renderThumbs();
      });
      item.append(img, name, remove);
      thumbs.append(item);
    });
  }

  function addFiles(list) {
    for (const file of list) files.push(file);
    renderThumbs();
  }

  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
  });
  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("over");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files) addFiles(event.dataTransfer.files);
  });

  const understandForm = $("understand-form");
  const understandError = $("understand-error");
  const answer = $("answer");
  const understandStats = $("understand-stats");
  let understandRun = null;

  async function understand(event) {
    event.preventDefault();
    if (!understandForm.reportValidity()) return;
    clearError(understandError);
    answer.textContent = "";
    understandStats.textContent = "Waiting for the first token…";
    const form = new FormData();
    for (const file of files) form.append("image", file, file.name);
    form.append("question", $("question").value);
    form.append("max_new_tokens", $("max-new-tokens").value);
    form.append("temperature", $("u-temperature").value || "0");
    form.append("stream", "true");

    const run = new AbortController();
    understandRun = run;
    $("understand-submit").disabled = true;
    $("understand-stop").disabled = false;
    answer.setAttribute("aria-busy", "true");
    let final = null;
    let failed = false;
    try {
      const response = await fetch("/understand", {
        method: "POST", headers: authHeaders(), body: form, signal: run.signal,
      });
      if (!response.ok) {
        failed = true;
        showError(understandError, statusHeading(response), await errorOf(response));
        understandStats.textContent = "";
        return;
      }
      await readEvents(response, (data) => {
        const payload = parseEvent(data);
        if (payload.error) {
          failed = true;
          showError(understandError, "Error during the stream (HTTP " + response.status + "): ", payload.error);
        } else if (typeof payload.text === "string") {
          answer.append(payload.text);
          understandStats.textContent = "Streaming…";
        } else if (payload.finish_reason) {
          final = payload;
        }
      });
      if (final) {
        const usage = final.usage || {};
        const timings = final.timings || {};
        understandStats.textContent =
          "finish_reason: " + final.finish_reason +
          " · " + usage.prompt_tokens + " prompt tokens, " + usage.completion_tokens + " new" +
          " · first token " + seconds(timings.first_token) + " · total " + seconds(timings.total);
      } else {
        understandStats.textContent = "";
        if (!failed) showError(understandError, "Stream ended early: ", { message: "no final event arrived." });
      }
    } catch (err) {
      understandStats.textContent = "";
      if (err.name === "AbortError") understandStats.textContent = "Stopped.";
      else showError(understandError, "Network error: ", { message: err.message });
    } finally {
      if (understandRun === run) understandRun = null;
      answer.setAttribute("aria-busy", "false");
      $("understand-submit").disabled = false;
      $("understand-stop").disabled = true;
    }
  }

  understandForm.addEventListener("submit", understand);
  $("understand-stop").addEventListener("click", () => understandRun && understandRun.abort());

  // ---- generation: prompt -> progress, previews, then images ----

  const generateForm = $("generate-form");
  const generateError = $("generate-error");
  const progress = $("generate-progress");
  const progressText = $("generate-progress-text");
  const gallery = $("gallery");
  const generateStats = $("generate-stats");
  let generateRun = null;

  function setProgress(step, total) {
    progress.max = total;
    progress.value = step;
    progressText.textContent = step + " / " + total;
  }

  function addSlot() {
    const item = document.createElement("li");
    item.dataset.testid = "image-slot";
    item.dataset.state = "waiting";
    const frame = document.createElement("div");
    frame.className = "frame";
    frame.textContent = "waiting…";
    const caption = document.createElement("div");
    caption.className = "caption";
    item.append(frame, caption);
    gallery.append(item);
    return item;
  }

  function makeSlots(count) {
    gallery.textContent = "";
    return Array.from({ length: count }, addSlot);
  }

  function slotImage(slot) {
    let img = slot.querySelector("img");
    if (!img) {
      const frame = slot.querySelector(".frame");
      frame.textContent = "";
      img = document.createElement("img");
      frame.append(img);
    }
    return img;
  }

  function showPreview(slot, index, b64) {
    const img = slotImage(slot);
    img.src = "data:image/png;base64," + b64;
    img.alt = "Preview of image " + (index + 1);
    img.dataset.state = "preview";
    slot.dataset.state = "preview";
  }

  function showImage(slot, index, image) {
    const img = slotImage(slot);
    const url = "data:image/png;base64," + image.b64_json;
    img.src = url;
    img.alt = "Image " + (index + 1) + ", seed " + image.seed;
    img.dataset.state = "final";
    slot.dataset.state = "final";
    slot.dataset.seed = String(image.seed);
    const caption = slot.querySelector(".caption");
    caption.textContent = "";
    const seed = document.createElement("span");
    seed.dataset.testid = "image-seed";
    seed.textContent = "seed " + image.seed;
    const link = document.createElement("a");
    link.href = url;
    link.download = "janus-" + image.seed + ".png";
    link.dataset.testid = "image-download";
    link.textContent = "Download";
    caption.append(seed, link);
  }

  function generationBody() {
    const body = {
      prompt: $("prompt").value,
      n: Number($("n").value),
      cfg_weight: Number($("cfg-weight").value || "5"),
      temperature: Number($("g-temperature").value || "1"),
      stream: true,
    };
    if ($("previews").checked) body.preview_every = Number($("preview-every").value || "48");
    let json = JSON.stringify(body);
    const seed = $("seed").value.trim();
    // written as digits, not through a JavaScript number, which would round seeds past 2**53
    if (seed) json = json.slice(0, -1) + ',"seed":' + seed + "}";
    return json;
  }

  async function generate(event) {
    event.preventDefault();
    const seedInput = $("seed");
    seedInput.setCustomValidity(/^\d*$/.test(seedInput.value.trim()) ? "" : "A seed is a whole number, 0 or more.");
    if (!generateForm.reportValidity()) return;
    clearError(generateError);
    generateStats.textContent = "Waiting for the first step…";
    const count = Number($("n").value);
    const slots = makeSlots(count);
    setProgress(0, 576);

    const run = new AbortController();
    generateRun = run;
    $("generate-submit").disabled = true;
    $("generate-stop").disabled = false;
    gallery.setAttribute("aria-busy", "true");
    let final = null;
    let failed = false;
    try {
      const response = await fetch("/generate", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: generationBody(),
        signal: run.signal,
      });
      if (!response.ok) {
        failed = true;
        showError(generateError, statusHeading(response), await errorOf(response));
        generateStats.textContent = "";
        gallery.textContent = "";
        return;
      }
      await readEvents(response, (data) => {
        const payload = parseEvent(data);
        if (payload.error) {
          failed = true;
          showError(generateError, "Error during the stream (HTTP " + response.status + "): ", payload.error);
        } else if (Array.isArray(payload.images)) {
          final = payload;
          setProgress(progress.max, progress.max);
          payload.images.forEach((image, index) => {
            if (index >= slots.length) slots.push(addSlot());
            showImage(slots[index], index, image);
          });
        } else if (typeof payload.step === "number") {
          setProgress(payload.step, payload.total);
          generateStats.textContent = "Drawing…";
          (payload.previews || []).forEach((b64, index) => {
            if (index < slots.length) showPreview(slots[index], index, b64);
          });
        }
      });
      if (final) {
        const usage = final.usage || {};
        const timings = final.timings || {};
        generateStats.textContent =
          final.images.length + (final.images.length === 1 ? " image" : " images") +
          " · " + usage.completion_tokens + " image tokens · total " + seconds(timings.total);
      } else {
        generateStats.textContent = "";
        if (!failed) showError(generateError, "Stream ended early: ", { message: "no images arrived." });
      }
    } catch (err) {
      generateStats.textContent = "";
      if (err.name === "AbortError") generateStats.textContent = "Stopped.";
      else showError(generateError, "Network error: ", { message: err.message });
    } finally {
      if (generateRun === run) generateRun = null;
      gallery.setAttribute("aria-busy", "false");
      $("generate-submit").disabled = false;
      $("generate-stop").disabled = true;
    }
  }

  const previewsBox = $("previews");
  previewsBox.addEventListener("change", () => {
    $("preview-every").disabled = !previewsBox.checked;
  });

  generateForm.addEventListener("submit", generate);
  $("generate-stop").addEventListener("click", () => generateRun && generateRun.abort());

  loadKey();
  tabFromHash();
  showModel();
})();
