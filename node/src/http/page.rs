//! The web chat page: plain HTML, JS and CSS embedded in the binary (no build step). The page
//! loads without a token and asks for one (or signs in with a paired browser's key); its API
//! calls carry `Authorization: Bearer` or the session cookie. It is an installable PWA: a web
//! app manifest, icons (SVG and PNG) and a service worker (`/sw.js`) that keeps the app shell
//! and recent answers for offline use. `GET /openapi.yaml` serves the API description.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");
const KEY_JS: &str = include_str!("web/key.js");
const PAIR_HTML: &str = include_str!("web/pair.html");
const PAIR_JS: &str = include_str!("web/pair.js");
const MD_JS: &str = include_str!("web/md.js");
const VIEWS_JS: &str = include_str!("web/views.js");
const SW_JS: &str = include_str!("web/sw.js");
const MANIFEST: &str = include_str!("web/manifest.webmanifest");
const ICON_SVG: &str = include_str!("web/icon.svg");
/// Made by `scripts/make-icons.py`.
const ICON_192: &[u8] = include_bytes!("web/icon-192.png");
const ICON_512: &[u8] = include_bytes!("web/icon-512.png");
const OPENAPI_YAML: &str = include_str!("../../../docs/openapi.yaml");

/// Content-Security-Policy of the page: only its own script, style and API.
/// (`blob:` images: previews of attached photos, fetched with the page's credentials.)
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data: blob:; manifest-src 'self'; worker-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const JS: &str = "text/javascript; charset=utf-8";

/// The page's routes (no token needed).
pub fn routes() -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/key.js",
            get(|| async { asset("text/javascript; charset=utf-8", KEY_JS) }),
        )
        .route(
            "/pair",
            get(|| async { asset("text/html; charset=utf-8", PAIR_HTML) }),
        )
        .route(
            "/pair.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAIR_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/md.js", get(|| async { asset(JS, MD_JS) }))
        .route("/views.js", get(|| async { asset(JS, VIEWS_JS) }))
        .route("/sw.js", get(|| async { asset(JS, SW_JS) }))
        .route(
            "/manifest.webmanifest",
            get(|| async { asset("application/manifest+json", MANIFEST) }),
        )
        .route(
            "/icon.svg",
            get(|| async { asset("image/svg+xml", ICON_SVG) }),
        )
        .route(
            "/icon-192.png",
            get(|| async { asset("image/png", ICON_192) }),
        )
        .route(
            "/icon-512.png",
            get(|| async { asset("image/png", ICON_512) }),
        )
        .route(
            "/openapi.yaml",
            get(|| async { asset("application/yaml; charset=utf-8", OPENAPI_YAML) }),
        )
}

fn asset(content_type: &'static str, body: impl IntoResponse) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}
