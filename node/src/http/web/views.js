// The page's views besides the chat, one function each, switched by the tab bar (at the
// bottom on a phone). They use app.js's `api`, `el`, `dollars` and only existing routes:
//   usage      GET /v1/usage?days=30 (cost per conversation, day and model; today's budget)
//   memory     GET /v1/memory, PUT /v1/memory
//   schedules  GET/POST /v1/schedules, PUT /v1/schedules/{id}/enabled, DELETE /v1/schedules/{id}
//   devices    GET /v1/devices, POST /v1/devices/{id}/revoke (admin only: a browser gets 403)
//   tools      GET /v1/tools, PUT /v1/tools/{name}/enabled (admin only)
// A new view: a <section data-view="NAME"> in index.html, a tab button, and an entry in
// `iomViews.views`.
"use strict";

const iomViews = (() => {
  const when = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : "—");

  // A row of label: value pairs.
  function facts(pairs) {
    const dl = el("dl", "facts");
    for (const [k, v] of pairs) dl.append(el("dt", null, k), el("dd", null, v));
    return dl;
  }

  function header(section, title, reload) {
    const h = el("div", "panel-head");
    h.append(el("h2", null, title));
    const r = el("button", "link", "Refresh");
    r.type = "button";
    r.addEventListener("click", () => reload(section));
    h.append(r);
    return h;
  }

  function failed(section, e) {
    if (e instanceof Unauthorized) return;
    section.append(el("p", "error", e.message));
  }

  function budgetBar(used, limit) {
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = `${Math.min(100, limit ? (100 * used) / limit : 0).toFixed(1)}%`;
    bar.append(fill);
    return bar;
  }

  async function usage(section) {
    section.replaceChildren(header(section, "Usage", usage));
    try {
      const u = await api("/v1/usage?days=30");
      const today = el("div", "card");
      today.append(el("h3", null, "Today"), facts([
        ["cost", dollars(u.today.cost_nanos)],
        ["tokens", (u.today.tokens || 0).toLocaleString()],
        ["answers", String(u.today.answers || 0)],
      ]));
      for (const b of u.budgets || []) {
        const who = b.scope === "mesh" ? "mesh" : `device ${b.device ? b.device.slice(0, 12) : ""}`;
        if (b.limit.nanos) {
          today.append(el("div", "muted", `${who} budget per ${b.period}: ${dollars(b.used.nanos)} of ${dollars(b.limit.nanos)}`),
            budgetBar(b.used.nanos, b.limit.nanos));
        }
        if (b.limit.tokens) {
          today.append(el("div", "muted", `${who} budget per ${b.period}: ${b.used.tokens.toLocaleString()} of ${b.limit.tokens.toLocaleString()} tokens`),
            budgetBar(b.used.tokens, b.limit.tokens));
        }
      }
      if (!u.budgets) today.append(el("div", "muted", "budgets: set and shown on the agent's device (iom budget)"));
      else if (!u.budgets.length) today.append(el("div", "muted", "no budget set (iom budget set)"));
      section.append(today);
      const table = (title, rows, label) => {
        const card = el("div", "card");
        card.append(el("h3", null, title));
        const list = el("ul", "rows");
        for (const r of rows) {
          const li = el("li");
          li.append(el("span", "name", label(r)), el("span", "muted", `${(r.tokens || 0).toLocaleString()} tokens`),
            el("span", "cost", dollars(r.cost_nanos)));
          list.append(li);
        }
        if (!rows.length) list.append(el("li", "muted", "nothing yet"));
        card.append(list);
        section.append(card);
      };
      table(`Per conversation (${u.days} days)`, u.by_conversation, (r) => r.name || r.key.slice(0, 12));
      table("Per day", u.by_day, (r) => r.key);
      table("Per model", u.by_model, (r) => r.key);
    } catch (e) {
      failed(section, e);
    }
  }

  async function memory(section) {
    section.replaceChildren(header(section, "Memory", memory));
    section.append(el("p", "muted", "What the assistant knows of you: its system prompt, synced to every device."));
    const text = el("textarea", "memory-text");
    text.id = "memory-text";
    text.rows = 12;
    const save = el("button", "primary", "Save");
    save.type = "button";
    save.id = "memory-save";
    const note = el("span", "muted");
    note.id = "memory-note";
    section.append(text, el("div", "actions"));
    section.lastChild.append(save, note);
    try {
      text.value = (await api("/v1/memory")).text || "";
    } catch (e) {
      failed(section, e);
    }
    save.addEventListener("click", async () => {
      save.disabled = true;
      note.textContent = "";
      try {
        const r = await api("/v1/memory", { method: "PUT", body: { text: text.value } });
        text.value = r.text;
        note.textContent = "saved";
      } catch (e) {
        note.textContent = "";
        failed(section, e);
      } finally {
        save.disabled = false;
      }
    });
  }

  async function schedules(section) {
    section.replaceChildren(header(section, "Schedules", schedules));
    const form = el("form", "card add-schedule");
    const cron = el("input");
    cron.id = "schedule-cron";
    cron.placeholder = "cron (UTC), e.g. 0 9 * * Mon-Fri or @daily";
    cron.required = true;
    const prompt = el("textarea");
    prompt.id = "schedule-prompt";
    prompt.rows = 2;
    prompt.placeholder = "what to ask each time";
    prompt.required = true;
    const add = el("button", "primary", "Add schedule");
    add.type = "submit";
    form.append(el("h3", null, "New schedule"), cron, prompt, add);
    const list = el("ul", "rows schedules");
    list.id = "schedule-list";
    section.append(form, list);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await api("/v1/schedules", { method: "POST", body: { cron: cron.value.trim(), prompt: prompt.value } });
        schedules(section);
      } catch (err) {
        failed(section, err);
      }
    });
    try {
      const r = await api("/v1/schedules");
      for (const s of r.schedules) {
        const li = el("li", "schedule");
        li.dataset.id = s.id;
        li.dataset.enabled = String(s.enabled);
        const main = el("div", "name");
        main.append(el("strong", null, s.cron), el("div", null, s.prompt),
          el("div", "muted", s.cron_error ? `bad cron: ${s.cron_error}`
            : `next ${s.enabled ? when(s.next_slot) : "— (disabled)"} · last ${when(s.last_fired_slot)}`));
        const toggle = el("button", null, s.enabled ? "Disable" : "Enable");
        toggle.type = "button";
        toggle.className = "toggle";
        toggle.addEventListener("click", async () => {
          try {
            await api(`/v1/schedules/${encodeURIComponent(s.id)}/enabled`, { method: "PUT", body: { enabled: !s.enabled } });
            schedules(section);
          } catch (err) { failed(section, err); }
        });
        const del = el("button", null, "Remove");
        del.type = "button";
        del.className = "remove";
        del.addEventListener("click", async () => {
          if (!confirm(`Remove the schedule "${s.cron}"?`)) return;
          try {
            await api(`/v1/schedules/${encodeURIComponent(s.id)}`, { method: "DELETE" });
            schedules(section);
          } catch (err) { failed(section, err); }
        });
        li.append(main, toggle, del);
        list.append(li);
      }
      if (!r.schedules.length) list.append(el("li", "muted", "no schedules yet"));
    } catch (e) {
      failed(section, e);
    }
  }

  async function devices(section) {
    section.replaceChildren(header(section, "Devices", devices));
    const list = el("ul", "rows devices");
    list.id = "device-list";
    section.append(list);
    try {
      const r = await api("/v1/devices");
      for (const d of r.devices) {
        const li = el("li", "device");
        li.dataset.device = d.device;
        li.dataset.revoked = String(d.revoked);
        const main = el("div", "name");
        const tags = [d.kind, d.admin && "admin", d.agent && "agent", d.this_device && "this node", d.revoked && "revoked"]
          .filter(Boolean).join(" · ");
        main.append(el("strong", null, d.name || d.device.slice(0, 12)), el("div", "muted", tags),
          el("div", "muted", `${d.connection}${d.rtt_ms ? `, ${d.rtt_ms} ms` : ""}${d.last_seen ? `, seen ${when(d.last_seen)}` : ""}`));
        li.append(main);
        if (!d.revoked && !d.this_device) {
          const revoke = el("button", null, "Revoke");
          revoke.type = "button";
          revoke.className = "revoke";
          revoke.addEventListener("click", async () => {
            if (!confirm(`Revoke ${d.name || d.device}? It loses access to the mesh at once.`)) return;
            try {
              await api(`/v1/devices/${encodeURIComponent(d.device)}/revoke`, { method: "POST" });
              devices(section);
            } catch (err) { failed(section, err); }
          });
          li.append(revoke);
        }
        list.append(li);
      }
    } catch (e) {
      failed(section, e);
    }
  }

  // The MCP servers of the mesh as the agent node reports them: state, egress, secrets (by
  // reference only: the values never leave the agent node) and tools; enable and disable.
  async function tools(section) {
    section.replaceChildren(header(section, "Tools", tools));
    section.append(el("p", "muted", "MCP servers, declared with `iom tools add`. The agent node runs each in its own locked-down container, with no network unless hosts are allowed."));
    const list = el("ul", "servers");
    list.id = "server-list";
    section.append(list);
    try {
      const r = await api("/v1/tools");
      for (const s of r.servers) list.append(serverCard(section, s));
      if (!r.servers.length) list.append(el("li", "muted", "no MCP servers yet: iom tools add NAME -- COMMAND…"));
    } catch (e) {
      failed(section, e);
    }
  }

  function serverCard(section, s) {
    const li = el("li", "server card");
    li.dataset.name = s.name;
    li.dataset.state = s.state;
    const spec = s.spec || {};
    const head = el("div", "server-head");
    head.append(el("strong", null, s.name), el("span", "badge", s.state));
    if (s.restarts) head.append(el("span", "muted", `${s.restarts} restart${s.restarts === 1 ? "" : "s"}`));
    if (s.spec) {
      const enabled = spec.enabled !== false;
      const toggle = el("button", "toggle", enabled ? "Disable" : "Enable");
      toggle.type = "button";
      toggle.addEventListener("click", async () => {
        try {
          await api(`/v1/tools/${encodeURIComponent(s.name)}/enabled`, { method: "PUT", body: { enabled: !enabled } });
          tools(section);
        } catch (err) { failed(section, err); }
      });
      head.append(toggle);
    }
    li.append(head, el("code", "command", (spec.command || []).join(" ")));
    const hosts = spec.allow_hosts || [];
    li.append(el("div", "muted egress", hosts.length ? `egress: ${hosts.join(", ")}` : "network: none"));
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
      const names = el("ul", "server-tools");
      for (const t of s.tools) {
        const item = el("li");
        item.append(el("code", null, t.name), document.createTextNode(" "), el("span", "muted", t.description || ""));
        names.append(item);
      }
      li.append(names);
    }
    return li;
  }

  const views = { usage, memory, schedules, devices, tools };

  // Shows one view (`chat` is app.js's conversation view) and marks its tab.
  function show(name) {
    for (const v of document.querySelectorAll(".view")) v.hidden = v.dataset.view !== name;
    for (const t of document.querySelectorAll("#tabs [data-tab]")) t.classList.toggle("active", t.dataset.tab === name);
    document.body.dataset.view = name;
    $("sidebar").classList.toggle("hidden-view", name !== "chat");
    const section = document.querySelector(`.view[data-view="${name}"]`);
    if (views[name] && section) views[name](section);
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.body.dataset.view = "chat";
    for (const t of document.querySelectorAll("#tabs [data-tab]")) {
      t.addEventListener("click", () => {
        // Chat again while in the chat: the conversation list (a thumb's way to it).
        if (t.dataset.tab === "chat" && document.body.dataset.view === "chat") {
          $("sidebar").classList.toggle("open");
          return;
        }
        show(t.dataset.tab);
      });
    }
  });

  return { show, views };
})();
