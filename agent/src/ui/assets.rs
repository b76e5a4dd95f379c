//! The web app's built files (`ui.assets_dir`, installed by the host image), served as they are: a file by its
//! path, a gzip copy (`<file>.gz`, written by the build) to browsers that accept it, and `index.html` for any
//! other path without an extension, so the app's own routes (`/vms/web1`) load it on a reload. Paths with `..`,
//! hidden names or NUL never reach the filesystem.

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use super::{json_error, UiState};

/// Vite names what it builds under `assets/` by content hash: such a file never changes.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Serves `GET`/`HEAD` of anything the other routes do not take.
pub(super) async fn serve(State(state): State<Arc<UiState>>, request: Request) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {}: only GET", request.method(), request.uri().path()),
        );
    }
    let dir = &state.node.config().ui.assets_dir;
    let path = request.uri().path();
    let Some(relative) = safe_relative(path) else {
        return json_error(StatusCode::BAD_REQUEST, format!("{path:?} is not a path the Host UI serves"));
    };
    let gzip = accepts_gzip(request.headers());
    if let Some(response) = file(&dir.join(&relative), gzip).await {
        return response;
    }
    if relative.extension().is_some() {
        return json_error(StatusCode::NOT_FOUND, format!("{path}: no such file"));
    }
    match file(&dir.join("index.html"), gzip).await {
        Some(response) => response,
        None => json_error(
            StatusCode::NOT_FOUND,
            format!("the Host UI is not installed: no index.html in {} (ui.assets_dir)", dir.display()),
        ),
    }
}

/// `path` as a relative path of normal components only; `/` is `index.html`.
fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.contains('\0') || path.contains('\\') || path.split('/').any(|part| part.starts_with('.')) {
        return None;
    }
    let relative = Path::new(path.trim_start_matches('/'));
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(if relative.as_os_str().is_empty() { PathBuf::from("index.html") } else { relative.to_owned() })
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| coding.split(';').next().is_some_and(|c| c.trim() == "gzip"))
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// A regular file (or its `.gz` copy when the browser takes gzip) as a response; `None` when there is none.
async fn file(path: &Path, gzip: bool) -> Option<Response> {
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let (bytes, gzipped) = match gzip.then(|| gz.clone()) {
        Some(gz) if is_file(&gz).await => (tokio::fs::read(&gz).await.ok()?, true),
        _ if is_file(path).await => (tokio::fs::read(path).await.ok()?, false),
        _ => return None,
    };
    let mut response = Response::new(Body::from(bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let hashed = path.parent().and_then(Path::file_name).is_some_and(|dir| dir == "assets");
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(if hashed { IMMUTABLE } else { "no-cache" }));
    if path.extension().is_some_and(|e| e == "html") {
        // The app loads only from this origin, and never inside another site's frame.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    Some(response.into_response())
}

async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_reach_the_filesystem() {
        assert_eq!(safe_relative("/"), Some(PathBuf::from("index.html")));
        assert_eq!(safe_relative("/assets/app-1a2b.js"), Some(PathBuf::from("assets/app-1a2b.js")));
        assert_eq!(safe_relative("/vms/web1"), Some(PathBuf::from("vms/web1")));
        assert_eq!(safe_relative("//etc/passwd"), Some(PathBuf::from("etc/passwd")), "under the assets dir");
        for bad in ["/../etc/passwd", "/assets/../../x", "/.env", "/a/./b", "/a\\b", "/a\0b"] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn gzip_is_taken_when_offered() {
        let mut headers = HeaderMap::new();
        assert!(!accepts_gzip(&headers));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("br;q=1, gzip;q=0.8"));
        assert!(accepts_gzip(&headers));
    }
}
