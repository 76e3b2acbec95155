// The iom web chat page. Plain JS, no build step. API calls carry the bearer token kept in
// localStorage (or a paired browser's session cookie); answers stream from the SSE events
// endpoint read with fetch (EventSource cannot send an Authorization header) and are rendered
// as Markdown by md.js (DOM nodes only). Files are attached as blobs; an ask typed while the
// node is unreachable waits in an IndexedDB outbox and goes out (with its request id, so a
// retry never runs twice) when it is back. The service worker (sw.js) keeps the app shell
// and recent answers for offline reading. The other views are in views.js.
"use strict";

const TOKEN_KEY = "iom.token";
const $ = (id) => document.getElementById(id);
const state = { token: localStorage.getItem(TOKEN_KEY) || "", current: null, streaming: 0, picked: [] };

class Unauthorized extends Error {}
// The node could not be reached (offline, or it is down).
class Unreachable extends Error {}

// A paired browser has no token: its session cookie goes along by itself.
const auth = () => (state.token ? { Authorization: "Bearer " + state.token } : {});

async function api(path, options = {}, retried = false) {
  const headers = auth();
  const raw = options.raw !== undefined;
  if (raw) headers["Content-Type"] = "application/octet-stream";
  else if (options.body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method: options.method || "GET",
      headers,
      body: raw ? options.raw : options.body === undefined ? undefined : JSON.stringify(options.body),
    });
  } catch (e) {
    setNet(false);
    throw new Unreachable("the node cannot be reached (offline?)");
  }
  // Served by the service worker from its cache: the node is not reachable.
  setNet(resp.headers.get("x-iom-offline") !== "1");
  // A paired browser's session ends with a node restart: sign a new challenge once.
  if (resp.status === 401 && !state.token && !retried && (await iomKey.login().catch(() => false))) {
    return api(path, options, true);
  }
  if (resp.status === 401) {
    showLogin(state.token ? "That token was refused; paste a valid one."
      : "This browser is not allowed here any more (revoked, or its session ended).");
    throw new Unauthorized("unauthorized");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error ? body.error.message : resp.status + " " + resp.statusText);
  return body;
}

// Shows whether the node answers (the header's badge; the outbox is flushed when it does).
function setNet(online) {
  const was = state.online !== false;
  state.online = online;
  const n = $("net");
  n.hidden = online;
  n.textContent = online ? "" : "offline: saved copies";
  if (online && !was) outbox.flush().catch(() => {});
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function dollars(nanos) {
  const usd = (nanos || 0) / 1e9;
  return "$" + usd.toFixed(usd < 0.01 && usd > 0 ? 4 : 2);
}

function tokens(usage) {
  if (!usage) return "";
  const i = usage.input_tokens || 0, o = usage.output_tokens || 0;
  const cached = usage.cache_read_input_tokens || 0;
  if (!(i || o || cached)) return "";
  const parts = [`${i.toLocaleString()} in · ${o.toLocaleString()} out tokens`];
  if (cached) parts.push(`${cached.toLocaleString()} from cache`);
  if (usage.cost_nanos) parts.push(dollars(usage.cost_nanos));
  return parts.join(" · ");
}

// Today's spend, and the budgets when this device is the agent.
async function loadSpend() {
  const u = await api("/v1/usage?days=1");
  const parts = [`today: ${dollars(u.today.cost_nanos)}, ${u.today.tokens.toLocaleString()} tokens`];
  for (const b of u.budgets || []) {
    if (b.scope !== "mesh" || b.period !== "day") continue;
    if (b.limit.nanos) parts.push(`budget ${dollars(b.used.nanos)} of ${dollars(b.limit.nanos)}`);
    if (b.limit.tokens) parts.push(`budget ${b.used.tokens.toLocaleString()} of ${b.limit.tokens.toLocaleString()} tokens`);
  }
  $("spend").textContent = parts.join(" · ");
}

function summaryBubble(s) {
  const li = el("li", "msg summary");
  li.append(el("div", "meta muted", `summary of ${s.requests} earlier request${s.requests === 1 ? "" : "s"} (what the assistant now knows of them)`));
  li.append(el("div", "text", s.text));
  return li;
}

function showLogin(message) {
  $("app").hidden = true;
  $("toggle-list").hidden = true;
  $("tabs").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

async function connect() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("toggle-list").hidden = false;
  $("tabs").hidden = false;
  outbox.badge().then(() => outbox.flush()).catch(() => {});
  try {
    await Promise.all([loadAgent(), loadConversations(), loadSpend(), loadApprovals()]);
    if (!state.approvalTimer) {
      state.approvalTimer = setInterval(() => loadApprovals().catch(() => {}), 10000);
    }
  } catch (e) {
    report(e);
  }
}

async function loadAgent() {
  const a = await api("/v1/agent");
  $("agent").textContent = a.agent
    ? `agent: ${a.name || a.agent.slice(0, 12)} (${a.connection})`
    : "no agent assigned yet";
}

async function loadConversations() {
  const { conversations } = await api("/v1/conversations");
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const li = el("li");
    li.dataset.id = c.id;
    if (c.id === state.current) li.classList.add("active");
    li.append(el("span", "title", c.title || "(untitled)"));
    const meta = [`${c.messages} messages`, tokens(c.usage)].filter(Boolean).join(" · ");
    li.append(el("span", "muted", meta));
    li.addEventListener("click", () => {
      $("sidebar").classList.remove("open");
      openConversation(c.id).catch((e) => {
        if (e instanceof Unreachable) $("chat-error").textContent = "offline, and this conversation was not kept on this device";
        else report(e);
      });
    });
    list.append(li);
  }
}

function newConversation() {
  state.current = null;
  $("conv-title").textContent = "New conversation";
  $("conv-usage").textContent = "";
  $("messages").replaceChildren();
  for (const li of $("conversations").children) li.classList.remove("active");
  $("sidebar").classList.remove("open");
  $("prompt").focus();
}

async function openConversation(id) {
  const c = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  state.current = id;
  $("conv-title").textContent = c.title || "(untitled)";
  $("conv-usage").textContent = tokens(c.usage);
  for (const li of $("conversations").children) li.classList.toggle("active", li.dataset.id === id);
  const box = $("messages");
  box.replaceChildren();
  const replies = new Map();
  for (const m of c.messages) if (m.role === "assistant" && m.reply_to) replies.set(m.reply_to, m);
  const summaries = new Map();
  for (const s of c.summaries || []) summaries.set(s.through, s);
  for (const m of c.messages) {
    if (m.role !== "user") continue;
    box.append(userBubble(promptText(m.text, m.attachments), m.attachments));
    const reply = replies.get(m.request_id);
    const bubble = assistantBubble();
    box.append(bubble.root);
    if (reply) {
      for (const t of reply.tool_calls || []) {
        const tool = bubble.addTool(t.name, t.input);
        bubble.finishTool(tool, t.output, t.is_error);
      }
      for (const f of sentFiles(reply)) bubble.file(f);
      bubble.setText(reply.text);
      bubble.finish(reply.usage, m.error, reply.model);
    } else if (m.status === "failed") {
      bubble.fail(m.error || "failed");
    } else {
      stream(id, m.request_id, bubble);
    }
    // A summary covers the turns up to here: shown after this request's answer.
    const summary = summaries.get(m.request_id);
    if (summary) box.append(summaryBubble(summary));
  }
  // Asks of this conversation still waiting in the outbox.
  for (const q of await outbox.list().catch(() => [])) {
    if (q.body.conversation === id) showQueued(q);
  }
  box.scrollTop = box.scrollHeight;
}

// A request's text without the note the node adds about its attachments (they are shown as
// chips instead).
function promptText(text, attachments) {
  if (!attachments || !attachments.length) return text;
  const cut = text.lastIndexOf("\n\n[Attached files, readable with your tools:");
  return cut >= 0 ? text.slice(0, cut) : text;
}

// A request's bubble; `files` are its attachments ({name, hash, len}), `queued` marks an ask
// waiting in the outbox.
function userBubble(text, files, queued) {
  const li = el("li", "msg user");
  li.append(el("div", "text", text));
  if (files && files.length) {
    const box = el("div", "files");
    for (const f of files) box.append(fileChip(f.name, f.hash, f.len, f.file));
    li.append(box);
  }
  if (queued) {
    li.dataset.queued = "true";
    li.append(el("div", "meta muted queued", "not sent yet: goes out when the node is reachable"));
  }
  return li;
}

const IMAGE = /\.(png|jpe?g|gif|webp|avif|bmp)$/i;

// A file of the conversation: its name and size, a preview for an image, and a download
// link. Blobs are fetched with the page's credentials (a bearer token cannot ride on a plain
// link), so the link gets its object URL on first use. `local` is a File not uploaded yet.
function fileChip(name, hash, len, local) {
  const chip = el("span", "chip");
  const a = el("a", "download", `↓ ${name}`);
  a.href = "#";
  a.download = name;
  if (hash) a.dataset.hash = hash;
  chip.append(a);
  if (len !== undefined && len !== null) chip.append(el("span", "muted", ` ${size(len)}`));
  const fetchBlob = async () => {
    if (local) return local;
    const resp = await fetch(`/v1/blobs/${encodeURIComponent(hash)}`, { headers: auth() });
    if (!resp.ok) throw new Error(`${name}: ${resp.status} ${resp.statusText}`);
    return resp.blob();
  };
  const ready = async () => {
    if (a.iomBlob) return;
    a.iomBlob = await fetchBlob();
    a.href = URL.createObjectURL(a.iomBlob);
    a.dataset.fetched = "true";
  };
  a.addEventListener("click", (e) => {
    if (a.dataset.fetched === "true") return;
    e.preventDefault();
    ready().then(() => a.click()).catch((err) => chip.append(el("span", "error", " " + err.message)));
  });
  if (IMAGE.test(name)) {
    ready().then(() => {
      const img = el("img", "preview");
      img.alt = name;
      img.src = a.href;
      chip.prepend(img);
    }).catch(() => {});
  }
  return chip;
}

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

// Files the agent sent in a stored reply: its send_file calls' outputs name them.
function sentFiles(reply) {
  const out = [];
  for (const t of reply.tool_calls || []) {
    if (t.name !== "send_file" || t.is_error) continue;
    const m = /^sent (.+) \((\d+) bytes, sha256 ([0-9a-f]{64})\)/.exec(t.output || "");
    if (m) out.push({ name: m[1], len: Number(m[2]), hash: m[3] });
  }
  return out;
}

function assistantBubble() {
  const root = el("li", "msg assistant");
  root.dataset.state = "pending";
  const tools = el("ul", "tools");
  const text = el("div", "text md");
  const meta = el("div", "meta muted");
  root.append(tools, text, meta);
  const scroll = () => { const b = $("messages"); b.scrollTop = b.scrollHeight; };
  // The answer's Markdown source; rendered again as it grows (never as HTML).
  let source = "";
  const render = () => { text.replaceChildren(iomMarkdown.render(source)); scroll(); };
  return {
    root,
    setStatus(s) { root.dataset.state = s; meta.textContent = s === "pending" ? "waiting for the agent…" : s + "…"; },
    append(delta) { source += delta; render(); },
    setText(t) { source = t || ""; render(); },
    addTool(name, input) {
      const li = el("li", "tool");
      li.dataset.state = "running";
      const d = el("details");
      d.append(el("summary", null, `⚙ ${name}`), el("pre", "input", input));
      li.append(d);
      tools.append(li);
      scroll();
      return li;
    },
    finishTool(li, output, isError) {
      if (!li) return;
      li.dataset.state = "done";
      li.dataset.error = isError ? "true" : "false";
      li.querySelector("details").append(el("pre", "output", output));
    },
    runningTool(name) {
      return [...tools.querySelectorAll('.tool[data-state="running"]')]
        .find((t) => t.querySelector("summary").textContent === `⚙ ${name}`);
    },
    // An approval card: the exact call, what it touches, and buttons while it is pending.
    approval(ev) {
      let card = tools.querySelector(`[data-approval="${CSS.escape(ev.id)}"]`);
      if (!card) {
        card = el("li", "approval");
        card.dataset.approval = ev.id;
        tools.append(card);
      }
      card.replaceChildren(approvalCard(ev));
      scroll();
    },
    // A file the agent sent (send_file): a download link.
    file(ev) {
      const li = el("li", "tool file");
      li.append(fileChip(ev.name, ev.hash, ev.len));
      tools.append(li);
      scroll();
    },
    finish(usage, note, model) {
      root.dataset.state = "done";
      meta.textContent = [tokens(usage), model && `by ${model}`, note].filter(Boolean).join(" · ");
    },
    fail(error) {
      root.dataset.state = "failed";
      meta.textContent = "";
      meta.append(el("span", "error", "failed: " + error));
    },
  };
}

// The body of an approval card (in a request's bubble and in the pending list).
function approvalCard(a) {
  const box = el("div", "card");
  box.dataset.state = a.effective_state || a.state;
  box.append(el("strong", null, `Approval ${a.id}: ${a.tool}`), el("pre", "input", a.input));
  const touches = el("ul", "touches");
  for (const t of a.touches || []) touches.append(el("li", null, t));
  box.append(touches);
  if (box.dataset.state === "pending") {
    const left = Math.max(0, a.expires_at - Math.floor(Date.now() / 1000));
    box.append(el("div", "muted", `denied automatically in ${Math.ceil(left / 60)} min unless an admin device answers`));
    const reason = el("input");
    reason.placeholder = "reason (optional)";
    const answer = (verb) => async () => {
      try {
        await api(`/v1/approvals/${encodeURIComponent(a.id)}/${verb}`, { method: "POST", body: { reason: reason.value || null } });
        box.dataset.state = verb === "approve" ? "approved" : "denied";
        box.querySelectorAll("button, input").forEach((b) => b.remove());
        box.append(el("div", "muted", verb === "approve" ? "approved; the agent runs it" : "denied"));
        loadApprovals().catch(() => {});
      } catch (e) {
        box.append(el("div", "error", e.message));
      }
    };
    const yes = el("button", "primary", "Approve");
    const no = el("button", null, "Deny");
    yes.type = no.type = "button";
    yes.addEventListener("click", answer("approve"));
    no.addEventListener("click", answer("deny"));
    box.append(reason, yes, no);
  } else {
    box.append(el("div", "muted", [box.dataset.state, a.reason].filter(Boolean).join(": ")));
  }
  return box;
}

// Pending approvals of the whole mesh (this device's copy of every conversation).
async function loadApprovals() {
  const r = await api("/v1/approvals");
  const list = $("approvals");
  // The open conversation shows its own approvals in its answer.
  const others = r.approvals.filter((a) => a.conversation !== state.current);
  list.replaceChildren(...others.map((a) => {
    const li = el("li", "approval");
    li.append(approvalCard(a));
    return li;
  }));
  list.hidden = others.length === 0;
}

// Parses a text/event-stream and calls onEvent(name, data) for each event.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += (data ? "\n" : "") + line.slice(5).replace(/^ /, "");
      }
      if (!data) continue;
      let parsed;
      try { parsed = JSON.parse(data); } catch { continue; }
      if (onEvent(name, parsed) === false) { reader.cancel().catch(() => {}); return; }
    }
  }
}

async function stream(conversation, requestId, bubble) {
  state.streaming++;
  try {
    const path = `/v1/conversations/${encodeURIComponent(conversation)}/requests/${encodeURIComponent(requestId)}/events`;
    const resp = await fetch(path, { headers: auth() });
    if (resp.status === 401) { showLogin("That token was refused; paste a valid one."); return; }
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      bubble.fail(body.error ? body.error.message : String(resp.status));
      return;
    }
    let finished = false;
    await readEvents(resp, (name, ev) => {
      switch (name) {
        case "status": bubble.setStatus(ev.status); break;
        case "text": bubble.root.dataset.state = "running"; bubble.append(ev.delta); break;
        case "tool_started": bubble.addTool(ev.name, ev.input); break;
        case "tool_finished": bubble.finishTool(bubble.runningTool(ev.name), ev.output, ev.is_error); break;
        case "retry": bubble.setStatus("retrying"); break;
        case "approval": bubble.approval(ev); loadApprovals().catch(() => {}); break;
        case "file": bubble.file(ev); break;
        case "done": bubble.setText(ev.text); bubble.finish(ev, ev.note, ev.model); finished = true; return false;
        case "failed": bubble.fail(ev.error); finished = true; return false;
      }
      return true;
    });
    if (!finished) bubble.fail("the event stream ended early; reload to see the answer");
  } catch (e) {
    bubble.fail(e.message);
  } finally {
    state.streaming--;
    if (state.current === conversation) refreshUsage(conversation).catch(() => {});
    loadConversations().catch(() => {});
    loadSpend().catch(() => {});
  }
}

async function refreshUsage(id) {
  const c = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  if (state.current === id) $("conv-usage").textContent = tokens(c.usage);
}

// A fresh request id (the node deduplicates retries with the same id).
function requestId() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function send(event) {
  event.preventDefault();
  const files = state.picked.slice();
  let prompt = $("prompt").value.trim();
  if (!prompt && !files.length) return;
  if (!prompt) prompt = files.length === 1 ? `(attached ${files[0].name})` : "(attached files)";
  $("send").disabled = true;
  $("chat-error").textContent = "";
  const body = { prompt, interface: "web", request_id: requestId() };
  if (state.current) body.conversation = state.current;
  const model = $("model").value.trim();
  if (model) body.model = model;
  const item = { request_id: body.request_id, body, files: files.map((f) => ({ name: f.name, file: f })), at: Date.now() };
  try {
    $("prompt").value = "";
    setPicked([]);
    if (!state.current) $("conv-title").textContent = prompt.slice(0, 60);
    const asked = await submit(item);
    showAsked(item, asked);
  } catch (e) {
    if (e instanceof Unreachable) {
      // Kept for later: it goes out when the node answers again.
      await outbox.add(item);
      showQueued(item);
    } else {
      $("prompt").value = prompt;
      setPicked(files);
      report(e);
    }
  } finally {
    $("send").disabled = false;
  }
}

// Uploads an ask's files as blobs (once; the hashes are kept on the item) and posts it.
async function submit(item) {
  const attachments = [];
  for (const f of item.files) {
    if (!f.hash) {
      const stored = await api("/v1/blobs", { method: "POST", raw: f.file });
      f.hash = stored.hash;
      f.len = stored.len;
    }
    attachments.push({ name: f.name, hash: f.hash });
  }
  const body = Object.assign({}, item.body);
  if (attachments.length) body.attachments = attachments;
  return api("/v1/ask", { method: "POST", body });
}

// The request and its answer bubble, streaming. A queued ask's bubbles are reused.
function showAsked(item, asked) {
  const box = $("messages");
  let user = box.querySelector(`[data-request="${CSS.escape(item.request_id)}"]`);
  const draft = !item.body.conversation && state.current === null;
  if (draft) state.current = asked.conversation;
  if (!user && state.current !== asked.conversation) {
    loadConversations().catch(() => {});
    return;
  }
  let bubble;
  if (user) {
    user.dataset.queued = "false";
    user.querySelector(".queued")?.remove();
    bubble = user.nextElementSibling?.iomBubble;
  } else {
    user = userBubble(item.body.prompt, item.files.map((f) => ({ name: f.name, hash: f.hash, len: f.len, file: f.file })));
    user.dataset.request = item.request_id;
    box.append(user);
  }
  if (!bubble) {
    bubble = assistantBubble();
    user.after(bubble.root);
  }
  bubble.setStatus("pending");
  if (asked.queued) bubble.root.querySelector(".meta").textContent = asked.note;
  loadConversations().catch(() => {});
  stream(asked.conversation, asked.request_id, bubble);
}

// An ask waiting in the outbox, shown where it was typed.
function showQueued(item) {
  const box = $("messages");
  if (box.querySelector(`[data-request="${CSS.escape(item.request_id)}"]`)) return;
  const user = userBubble(item.body.prompt, item.files.map((f) => ({ name: f.name, len: f.file.size, file: f.file })), true);
  user.dataset.request = item.request_id;
  const bubble = assistantBubble();
  bubble.root.iomBubble = bubble;
  bubble.root.dataset.state = "queued";
  bubble.root.querySelector(".meta").textContent = "queued";
  box.append(user, bubble.root);
  box.scrollTop = box.scrollHeight;
}

// Asks typed while the node could not be reached, in IndexedDB (Files included, so a photo
// waits too) until they are sent.
const outbox = (() => {
  const run = idbStore("iom-outbox", "asks", "request_id").run;
  let flushing = null;
  const list = async () => (await run("readonly", (s) => s.getAll())).sort((a, b) => a.at - b.at);
  const add = async (item) => { await run("readwrite", (s) => s.put(item)); badge(); };
  const remove = async (id) => { await run("readwrite", (s) => s.delete(id)); badge(); };
  async function badge() {
    const n = (await list().catch(() => [])).length;
    document.body.dataset.outbox = String(n);
    if (n && !state.outboxTimer) state.outboxTimer = setInterval(() => flush().catch(() => {}), 3000);
    if (!n && state.outboxTimer) { clearInterval(state.outboxTimer); state.outboxTimer = null; }
  }
  // Sends what waits, oldest first; stops at the first that cannot reach the node.
  async function flush() {
    if (flushing) return flushing;
    flushing = (async () => {
      for (const item of await list()) {
        let asked;
        try {
          asked = await submit(item);
        } catch (e) {
          if (e instanceof Unreachable) { await run("readwrite", (s) => s.put(item)); return; }
          if (e instanceof Unauthorized) return;
          // Refused for good (bad model, too large...): dropped, with the reason shown.
          await remove(item.request_id);
          const user = $("messages").querySelector(`[data-request="${CSS.escape(item.request_id)}"]`);
          user?.nextElementSibling?.iomBubble?.fail(e.message);
          continue;
        }
        await remove(item.request_id);
        showAsked(item, asked);
      }
    })().finally(() => { flushing = null; });
    return flushing;
  }
  return { list, add, flush, badge };
})();

// The files picked for the next ask, shown above the composer.
function setPicked(files) {
  state.picked = files;
  const box = $("picked");
  box.replaceChildren(...files.map((f, i) => {
    const li = el("li", "chip");
    li.append(el("span", null, `${f.name} `), el("span", "muted", size(f.size)));
    const x = el("button", "link", "✕");
    x.type = "button";
    x.setAttribute("aria-label", `remove ${f.name}`);
    x.addEventListener("click", () => setPicked(state.picked.filter((_, j) => j !== i)));
    li.append(x);
    return li;
  }));
  box.hidden = files.length === 0;
}

// Shows an error; not a refused token (the login form says it) nor an unreachable node (the
// header's badge does).
function report(e) {
  if (!(e instanceof Unauthorized) && !(e instanceof Unreachable)) $("chat-error").textContent = e.message;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    localStorage.setItem(TOKEN_KEY, state.token);
    connect();
  });
  $("forget-token").addEventListener("click", () => {
    navigator.serviceWorker?.controller?.postMessage("forget");
    localStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("token-input").value = "";
    showLogin("");
  });
  $("new-conv").addEventListener("click", newConversation);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("toggle-list").addEventListener("click", () => $("sidebar").classList.toggle("open"));
  $("file").addEventListener("change", (e) => {
    setPicked(state.picked.concat(Array.from(e.target.files || [])));
    e.target.value = "";
  });
  window.addEventListener("online", () => outbox.flush().catch(() => {}));
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
  if (state.token) connect();
  else {
    // Offline, a paired browser cannot sign a challenge: it opens on the saved copies.
    iomKey.login().then((ok) => (ok ? connect() : showLogin("")))
      .catch(() => iomKey.load().then((k) => (k ? connect() : showLogin(""))).catch(() => showLogin("")));
  }
});
