// Markdown for answers, rendered safely: model output is untrusted, so this builds DOM nodes
// with createElement and textContent only (never innerHTML). Raw HTML in the text stays text;
// links are kept only for http: and https: URLs. The subset: fenced code blocks, inline code,
// headings, lists (ordered and not), block quotes, rules, emphasis, strong, strikethrough,
// links and bare URLs, paragraphs (single line breaks kept).
"use strict";

const iomMarkdown = (() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^( *)[-*+]\s+(.*)$/;
  const ORDERED = /^( *)(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;

  function node(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }

  // A URL safe to link to, or null: absolute http(s) only (no javascript:, data:, ...).
  function safeUrl(text) {
    let u;
    try { u = new URL(text.trim()); } catch { return null; }
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
  }

  function link(href, children) {
    const a = node("a");
    a.href = href;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    a.append(...children);
    return a;
  }

  // Inline spans: code, links, bare URLs, strong, emphasis, strikethrough, escapes.
  const INLINE = new RegExp([
    "(`+)([\\s\\S]*?[^`])\\1(?!`)", // 1, 2: code span
    "\\[([^\\]\\n]*)\\]\\(\\s*<?([^)\\s>]*)>?(?:\\s+\"[^\"]*\")?\\s*\\)", // 3, 4: link
    "(https?:\\/\\/[^\\s<>]*[^\\s<>.,;:!?'\")\\]])", // 5: bare URL
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 6: strong
    "__(?=\\S)([\\s\\S]*?\\S)__(?![A-Za-z0-9_])", // 7: strong
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 8: emphasis
    "_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![A-Za-z0-9_])", // 9: emphasis
    "~~(?=\\S)([\\s\\S]*?\\S)~~", // 10: strikethrough
    "\\\\([\\\\`*_\\[\\]()#+\\-.!~>|{}])", // 11: escape
  ].join("|"), "g");

  function inline(text, inLink) {
    const out = [];
    let last = 0;
    INLINE.lastIndex = 0;
    let m;
    // Each match is handled with its own copy of the regex state (recursion resets it).
    while ((m = INLINE.exec(text)) !== null) {
      const at = m.index, end = INLINE.lastIndex;
      // Intraword underscores (snake_case) are not emphasis.
      if ((m[7] !== undefined || m[9] !== undefined) && at > 0 && /[A-Za-z0-9_]/.test(text[at - 1])) {
        INLINE.lastIndex = at + 1;
        continue;
      }
      let made = null;
      if (m[2] !== undefined) {
        made = node("code");
        made.textContent = m[2].length > 2 && m[2][0] === " " && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
      } else if (m[3] !== undefined) {
        const href = inLink ? null : safeUrl(m[4]);
        // A link to anything but http(s) stays as its literal text.
        made = href ? link(href, inline(m[3], true)) : document.createTextNode(m[0]);
      } else if (m[5] !== undefined) {
        const href = inLink ? null : safeUrl(m[5]);
        made = href ? link(href, [document.createTextNode(m[5])]) : document.createTextNode(m[5]);
      } else if (m[6] !== undefined || m[7] !== undefined) {
        made = node("strong");
        made.append(...inline(m[6] !== undefined ? m[6] : m[7], inLink));
      } else if (m[8] !== undefined || m[9] !== undefined) {
        made = node("em");
        made.append(...inline(m[8] !== undefined ? m[8] : m[9], inLink));
      } else if (m[10] !== undefined) {
        made = node("del");
        made.append(...inline(m[10], inLink));
      } else if (m[11] !== undefined) {
        made = document.createTextNode(m[11]);
      }
      if (at > last) out.push(document.createTextNode(text.slice(last, at)));
      out.push(made);
      last = end;
      INLINE.lastIndex = end;
    }
    if (last < text.length) out.push(document.createTextNode(text.slice(last)));
    return out;
  }

  // Appends a paragraph of lines (single line breaks kept as <br>).
  function paragraph(parent, lines) {
    if (!lines.length) return;
    const p = node("p");
    lines.forEach((line, i) => {
      if (i) p.append(node("br"));
      p.append(...inline(line.trim(), false));
    });
    parent.append(p);
  }

  function blocks(parent, lines) {
    let para = [];
    const flush = () => { paragraph(parent, para); para = []; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const fence = m[1];
        const body = [];
        i++;
        // An unclosed fence (an answer still streaming) runs to the end.
        while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length))
          && lines[i].trim().replace(new RegExp("^\\" + fence[0] + "+"), "").trim() === "")) {
          body.push(lines[i]);
          i++;
        }
        const pre = node("pre", "code");
        const code = node("code");
        if (m[2]) code.dataset.lang = m[2];
        code.textContent = body.join("\n");
        pre.append(code);
        parent.append(pre);
      } else if (line.trim() === "") {
        flush();
      } else if ((m = HEADING.exec(line))) {
        flush();
        const h = node("h" + Math.min(6, m[1].length + 2));
        h.append(...inline(m[2], false));
        parent.append(h);
      } else if (RULE.test(line)) {
        flush();
        parent.append(node("hr"));
      } else if (QUOTE.test(line)) {
        flush();
        const inner = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
        i--;
        const q = node("blockquote");
        blocks(q, inner);
        parent.append(q);
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        flush();
        i = list(parent, lines, i) - 1;
      } else {
        para.push(line);
      }
    }
    flush();
  }

  // A list starting at lines[start]; items indented deeper than its own make nested lists.
  // Returns the index of the first line after it.
  function list(parent, lines, start) {
    const first = ORDERED.exec(lines[start]);
    const ordered = !!first;
    const indent = (first || BULLET.exec(lines[start]))[1].length;
    const l = node(ordered ? "ol" : "ul");
    if (ordered && first[2] !== "1") l.start = Number(first[2]);
    let i = start, item = null, text = [];
    const close = () => {
      if (item) paragraphInto(item, text);
      text = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const m = ordered ? ORDERED.exec(line) : BULLET.exec(line);
      const other = ordered ? BULLET.exec(line) : ORDERED.exec(line);
      if (m && m[1].length === indent) {
        close();
        item = node("li");
        l.append(item);
        text = [ordered ? m[3] : m[2]];
        i++;
      } else if ((m || other) && (m || other)[1].length > indent && item) {
        close();
        i = list(item, lines, i);
      } else if (item && line.trim() !== "" && /^\s+/.test(line) && !FENCE.test(line)) {
        text.push(line.trim());
        i++;
      } else {
        break;
      }
    }
    close();
    parent.append(l);
    return i;
  }

  function paragraphInto(li, lines) {
    if (!lines.length) return;
    // The item's own text goes before any nested list already in it.
    const span = document.createDocumentFragment();
    lines.forEach((line, i) => {
      if (i) span.append(node("br"));
      span.append(...inline(line, false));
    });
    li.insertBefore(span, li.firstChild);
  }

  // The rendered text as a fragment.
  function render(text) {
    const frag = document.createDocumentFragment();
    blocks(frag, String(text || "").replace(/\r\n?/g, "\n").split("\n"));
    return frag;
  }

  return { render, safeUrl };
})();
