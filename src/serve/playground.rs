//! The web playground at `/`: one HTML page, a script and a style sheet, embedded in the binary
//! (no CDN: it works offline). It is a client of the public JSON API only — `/v1/models`,
//! `/v1/vectors`, `/v1/chat/completions` (streamed) — with the API key the user types in, so
//! everything it does can be scripted against the same routes. The assets are public (like
//! `/health`); every API call the page makes is authorized as usual. A Content-Security-Policy
//! keeps the page from fetching anything but this server.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("playground/index.html");
const SCRIPT: &str = include_str!("playground/playground.js");
const STYLE: &str = include_str!("playground/playground.css");

/// The asset paths (the auth middleware lets them through without a key).
pub const ASSETS: [&str; 3] = ["/", "/playground.js", "/playground.css"];

const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

pub(super) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(super) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_weight_is_within_budget_and_references_only_this_server() {
        // JS + CSS at most 200 KB (issue 17's budget); no absolute URL anywhere in the assets
        // (the SVG namespace is a name, never fetched).
        assert!(SCRIPT.len() + STYLE.len() <= 200 * 1024, "{} bytes", SCRIPT.len() + STYLE.len());
        for (name, text) in [("index.html", INDEX), ("playground.js", SCRIPT), ("playground.css", STYLE)] {
            let text = &text.replace("\"http://www.w3.org/2000/svg\"", "");
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(scheme), "{name} mentions {scheme}");
            }
        }
        for id in ["prompt", "send"] {
            assert!(INDEX.contains(&format!("data-testid=\"{id}\"")), "index.html lacks data-testid={id}");
        }
    }
}
