// The iom web chat page. Plain JS, no build step. API calls carry the bearer token kept in
// localStorage; answers stream from the SSE events endpoint read with fetch (EventSource
// cannot send an Authorization header).
"use strict";

const TOKEN_KEY = "iom.token";
const $ = (id) => document.getElementById(id);
const state = { token: localStorage.getItem(TOKEN_KEY) || "", current: null, streaming: 0 };

class Unauthorized extends Error {}

// A paired browser has no token: its session cookie goes along by itself.
const auth = () => (state.token ? { Authorization: "Bearer " + state.token } : {});

async function api(path, options = {}) {
  const headers = auth();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (resp.status === 401) {
    showLogin(state.token ? "That token was refused; paste a valid one."
      : "This browser is not allowed here any more (revoked, or its session ended).");
    throw new Unauthorized("unauthorized");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error ? body.error.message : resp.status + " " + resp.statusText);
  return body;
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
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

async function connect() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("toggle-list").hidden = false;
  try {
    await Promise.all([loadAgent(), loadConversations(), loadSpend(), loadApprovals()]);
    if (!state.approvalTimer) {
      state.approvalTimer = setInterval(() => loadApprovals().catch(() => {}), 10000);
    }
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("chat-error").textContent = e.message;
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
      openConversation(c.id).catch(report);
    });
    list.append(li);
  }
}

// Shows the chat (true) or the MCP servers view (false).
function showChat(chat) {
  document.querySelector("main.chat").hidden = !chat;
  $("servers-view").hidden = chat;
  $("show-servers").classList.toggle("active", !chat);
}

function newConversation() {
  showChat(true);
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
  showChat(true);
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
    box.append(userBubble(m.text));
    const reply = replies.get(m.request_id);
    const bubble = assistantBubble();
    box.append(bubble.root);
    if (reply) {
      for (const t of reply.tool_calls || []) {
        const tool = bubble.addTool(t.name, t.input);
        bubble.finishTool(tool, t.output, t.is_error);
      }
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
  box.scrollTop = box.scrollHeight;
}

function userBubble(text) {
  const li = el("li", "msg user");
  li.append(el("div", "text", text));
  return li;
}

function assistantBubble() {
  const root = el("li", "msg assistant");
  root.dataset.state = "pending";
  const tools = el("ul", "tools");
  const text = el("div", "text");
  const meta = el("div", "meta muted");
  root.append(tools, text, meta);
  const scroll = () => { const b = $("messages"); b.scrollTop = b.scrollHeight; };
  return {
    root,
    setStatus(s) { root.dataset.state = s; meta.textContent = s === "pending" ? "waiting for the agent…" : s + "…"; },
    append(delta) { text.textContent += delta; scroll(); },
    setText(t) { text.textContent = t; scroll(); },
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
    file(ev) {
      const li = el("li", "tool");
      li.append(el("span", null, `📎 ${ev.name} (${ev.len} bytes) — iom blob get ${ev.hash} -o ${ev.name}`));
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

// The MCP servers of the mesh (`GET /v1/tools`): state as the agent node reports it, egress,
// tools, and enable/disable (admin devices; others get the server's 403 message).
async function loadServers() {
  $("servers-error").textContent = "";
  const r = await api("/v1/tools");
  const list = $("servers");
  if (!r.servers.length) {
    list.replaceChildren(el("li", "muted", "No MCP servers yet: add one with `iom tools add NAME -- COMMAND…` (docs/mcp.md)."));
    return;
  }
  list.replaceChildren(...r.servers.map(serverCard));
}

function serverCard(s) {
  const li = el("li", "server");
  li.dataset.state = s.state;
  const spec = s.spec || {};
  const head = el("div", "server-head");
  head.append(el("strong", null, s.name), el("span", "badge", s.state));
  if (s.restarts) head.append(el("span", "muted", `${s.restarts} restart${s.restarts === 1 ? "" : "s"}`));
  const enabled = spec.enabled !== false;
  const toggle = el("button", null, enabled ? "Disable" : "Enable");
  toggle.type = "button";
  toggle.addEventListener("click", async () => {
    toggle.disabled = true;
    try {
      await api(`/v1/tools/${encodeURIComponent(s.name)}/enabled`, { method: "PUT", body: { enabled: !enabled } });
      await loadServers();
    } catch (e) {
      if (!(e instanceof Unauthorized)) $("servers-error").textContent = `${s.name}: ${e.message}`;
      toggle.disabled = false;
    }
  });
  if (s.spec) head.append(toggle);
  li.append(head);
  li.append(el("code", "command", (spec.command || []).join(" ")));
  const hosts = spec.allow_hosts || [];
  li.append(el("div", "muted", hosts.length ? `egress: ${hosts.join(", ")}` : "network: none"));
  for (const h of spec.secret_headers || []) {
    li.append(el("div", "muted", `secret header for ${h.host}: ${h.header}: ${h.value}`));
  }
  for (const [k, v] of Object.entries(spec.secret_env || {})) {
    li.append(el("div", "muted", `secret in its environment: ${k}=${v}`));
  }
  if (s.refused) li.append(el("div", "error", `refused: ${s.refused}`));
  if (s.error) li.append(el("div", "error", `last error: ${s.error}`));
  if (s.state === "failed" && s.retry_at) {
    const left = Math.max(0, s.retry_at - Math.floor(Date.now() / 1000));
    li.append(el("div", "muted", `next start in ${left} s`));
  }
  if (s.tools && s.tools.length) {
    const tools = el("ul", "server-tools");
    for (const t of s.tools) {
      const item = el("li");
      item.append(el("code", null, t.name), document.createTextNode(" "), el("span", "muted", t.description || ""));
      tools.append(item);
    }
    li.append(tools);
  }
  return li;
}

function openServers() {
  showChat(false);
  $("sidebar").classList.remove("open");
  loadServers().catch((e) => {
    if (!(e instanceof Unauthorized)) $("servers-error").textContent = e.message;
  });
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

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("send").disabled = true;
  $("chat-error").textContent = "";
  try {
    const body = { prompt, interface: "web" };
    if (state.current) body.conversation = state.current;
    const model = $("model").value.trim();
    if (model) body.model = model;
    const asked = await api("/v1/ask", { method: "POST", body });
    $("prompt").value = "";
    if (!state.current) {
      state.current = asked.conversation;
      $("conv-title").textContent = prompt.slice(0, 60);
    }
    $("messages").append(userBubble(prompt));
    const bubble = assistantBubble();
    bubble.setStatus("pending");
    if (asked.queued) bubble.root.querySelector(".meta").textContent = asked.note;
    $("messages").append(bubble.root);
    loadConversations().catch(() => {});
    stream(asked.conversation, asked.request_id, bubble);
  } catch (e) {
    report(e);
  } finally {
    $("send").disabled = false;
  }
}

function report(e) {
  if (!(e instanceof Unauthorized)) $("chat-error").textContent = e.message;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    localStorage.setItem(TOKEN_KEY, state.token);
    connect();
  });
  $("forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("token-input").value = "";
    showLogin("");
  });
  $("new-conv").addEventListener("click", newConversation);
  $("show-servers").addEventListener("click", openServers);
  $("servers-refresh").addEventListener("click", openServers);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("toggle-list").addEventListener("click", () => $("sidebar").classList.toggle("open"));
  if (state.token) connect();
  else iomKey.login().then((ok) => (ok ? connect() : showLogin(""))).catch(() => showLogin(""));
});
