// Pairs this browser as a device of the mesh with the invite in the URL's fragment (which no
// server sees): makes a key, proves knowledge of the invite secret bound to the inviter and
// this key (HMAC, as `iom join` does; the secret never leaves the page), signs the request,
// and keeps the key only when the node accepted it.
"use strict";

const $ = (id) => document.getElementById(id);
const K = iomKey;

const MESSAGES = {
  invite_used: "This invite was already used. Ask for a new one (iom invite --web).",
  invite_expired: "This invite has expired. Ask for a new one (iom invite --web).",
  unknown_invite: "This invite link is damaged or was not made by this node (was it changed?).",
  bad_proof: "This invite link is damaged (was it changed?). Ask for a new one.",
  rate_limited: "Too many failed attempts; wait a minute and try again.",
};

function fail(code, fallback) {
  document.body.dataset.state = "failed";
  document.body.dataset.error = code;
  $("pair-error").textContent = MESSAGES[code] || fallback || code;
  $("pair").disabled = true;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

async function pair(secret, inviter) {
  const key = await K.generate();
  const hmacKey = await crypto.subtle.importKey("raw", secret, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const proof = new Uint8Array(await crypto.subtle.sign("HMAC", hmacKey, K.concat(K.enc("iom-pair-v1"), inviter, key.raw)));
  const invite = await sha256(K.concat(K.enc("iom-invite-id-v1\0"), secret));
  const signature = await K.sign(key, K.concat(K.enc("iom-browser-pair-v1"), invite, proof));
  const r = await fetch("/v1/pair/browser", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      invite: hex(invite), key: K.b64e(key.raw), name: $("device-name").value.trim(),
      proof: K.b64e(proof), signature: K.b64e(signature),
    }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = body.error || {};
    fail(e.code || String(r.status), e.message);
    return;
  }
  await K.store(key);
  if (!(await K.login())) { fail("session", "Paired, but the node refused the first session."); return; }
  document.body.dataset.state = "paired";
  document.body.dataset.device = body.device;
  $("pair").hidden = true;
  $("pair-done").hidden = false;
}

// Another invite link opened in this tab changes only the fragment: start over with it.
window.addEventListener("hashchange", () => location.reload());

document.addEventListener("DOMContentLoaded", async () => {
  const fragment = location.hash.slice(1);
  // The secret leaves the address bar and the history at once.
  history.replaceState(null, "", location.pathname);
  let secret;
  try { secret = K.b64d(fragment); } catch (_) { secret = new Uint8Array(); }
  if (secret.length !== 32) { fail("no_invite", "This link holds no invite (or it was cut or changed). Open the whole link again."); return; }
  if (!(crypto.subtle && "generateKey" in crypto.subtle)) { fail("no_webcrypto", "This browser cannot make a device key here (WebCrypto needs HTTPS)."); return; }
  const info = await fetch("/v1/pair/info").then((r) => r.json()).catch(() => null);
  if (!info) { fail("offline", "Cannot reach the node."); return; }
  $("pair-about").textContent = `Join the mesh of device “${info.name}”. This browser gets its own key; it never leaves it.`;
  $("device-name").value = /Mobi|Android/.test(navigator.userAgent) ? "phone" : "browser";
  $("pair").disabled = false;
  document.body.dataset.state = "ready";
  $("pair-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("pair").disabled = true;
    pair(secret, K.b64d(info.inviter)).catch((err) => fail("error", err.message));
  });
});
