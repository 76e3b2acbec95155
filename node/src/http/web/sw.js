// The page's service worker: the app shell and the last answers of the read-only API calls
// (conversation list, conversations, agent, usage, memory, schedules, devices) are cached, so
// the page opens and recent conversations read offline. Network first: online, the page
// always gets fresh files and data; the cache is only the fallback. Event streams, blobs and
// every non-GET request pass through untouched (asks typed offline wait in the page's
// IndexedDB outbox, app.js).
"use strict";

const SHELL = "iom-shell-v1";
const DATA = "iom-data-v1";
const SHELL_FILES = ["/", "/app.js", "/md.js", "/views.js", "/key.js", "/style.css",
  "/manifest.webmanifest", "/icon.svg", "/icon-192.png", "/icon-512.png"];
// Read-only API answers kept for offline reading.
const CACHED_API = /^\/v1\/(conversations(\/[^/]+)?|agent|usage|memory|schedules|devices)$/;
// At most this many API answers are kept (oldest dropped first).
const MAX_DATA = 60;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((c) => c.addAll(SHELL_FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name !== SHELL && name !== DATA) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

async function trim(cache) {
  const keys = await cache.keys();
  for (let i = 0; i < keys.length - MAX_DATA; i++) await cache.delete(keys[i]);
}

// Network first; a good answer refreshes the cache; offline, the cached copy (marked with
// `x-iom-offline: 1` so the page can say it is showing a saved copy).
async function networkFirst(request, cacheName, key) {
  const cache = await caches.open(cacheName);
  try {
    const resp = await fetch(request);
    if (resp.ok) {
      await cache.delete(key);
      await cache.put(key, resp.clone());
      if (cacheName === DATA) trim(cache).catch(() => {});
    }
    return resp;
  } catch (e) {
    const hit = await cache.match(key, { ignoreVary: true });
    if (!hit) throw e;
    const headers = new Headers(hit.headers);
    headers.set("x-iom-offline", "1");
    return new Response(await hit.blob(), { status: hit.status, statusText: hit.statusText, headers });
  }
}

self.addEventListener("fetch", (event) => {
  const req = event.request;
  const url = new URL(req.url);
  if (req.method !== "GET" || url.origin !== self.location.origin) return;
  if (req.mode === "navigate" && url.pathname === "/") {
    event.respondWith(networkFirst(req, SHELL, "/"));
  } else if (SHELL_FILES.includes(url.pathname)) {
    event.respondWith(networkFirst(req, SHELL, url.pathname));
  } else if (CACHED_API.test(url.pathname)) {
    event.respondWith(networkFirst(req, DATA, url.pathname + url.search));
  }
});

// The page asks to forget cached data (its token was dropped).
self.addEventListener("message", (event) => {
  if (event.data === "forget") event.waitUntil(caches.delete(DATA));
});
