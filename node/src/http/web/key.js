// This browser's device key: Ed25519 made with WebCrypto, non-extractable, kept in IndexedDB.
// Its public half is the device id. Shared by the pairing page and the chat page.
"use strict";

// One IndexedDB object store: `run(mode, f)` runs the request `f(store)` in a transaction and
// resolves to its result. Also used by app.js's outbox.
function idbStore(name, store, keyPath) {
  function open() {
    return new Promise((resolve, reject) => {
      const r = indexedDB.open(name, 1);
      r.onupgradeneeded = () => r.result.createObjectStore(store, keyPath ? { keyPath } : undefined);
      r.onsuccess = () => resolve(r.result);
      r.onerror = () => reject(r.error);
    });
  }
  async function run(mode, f) {
    const db = await open();
    return new Promise((resolve, reject) => {
      const r = f(db.transaction(store, mode).objectStore(store));
      r.onsuccess = () => resolve(r.result);
      r.onerror = () => reject(r.error);
    });
  }
  return { run };
}

const iomKey = (() => {
  const DB = "iom", STORE = "keys", ID = "device";
  const enc = (s) => new TextEncoder().encode(s);

  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let i = 0;
    for (const p of parts) { out.set(p, i); i += p.length; }
    return out;
  }

  function b64e(bytes) {
    let s = "";
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function b64d(text) {
    const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(s, (c) => c.charCodeAt(0));
  }

  const request = idbStore(DB, STORE).run;

  // A new key pair, not yet stored: { privateKey, publicKey, raw }.
  async function generate() {
    const kp = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    const raw = new Uint8Array(await crypto.subtle.exportKey("raw", kp.publicKey));
    return { privateKey: kp.privateKey, publicKey: kp.publicKey, raw };
  }

  const store = (key) => request("readwrite", (s) => s.put(key, ID));
  const load = () => request("readonly", (s) => s.get(ID));

  async function sign(key, bytes) {
    return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key.privateKey, bytes));
  }

  // Signs a fresh challenge and gets a session cookie; false when this browser holds no key
  // or the node refuses it (not paired here, or revoked).
  async function login() {
    const key = await load().catch(() => undefined);
    if (!key) return false;
    const c = await fetch("/v1/session/challenge").then((r) => r.json());
    const signature = await sign(key, concat(enc("iom-session-v1"), b64d(c.challenge)));
    const r = await fetch("/v1/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: b64e(key.raw), challenge: c.challenge, signature: b64e(signature) }),
    });
    return r.ok;
  }

  return { enc, concat, b64e, b64d, generate, store, load, sign, login };
})();
