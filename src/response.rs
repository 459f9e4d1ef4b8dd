//! Small shared HTTP answer builders: every error of both listeners is JSON
//! `{"error": "...", "detail": "..."}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// A JSON error answer.
pub fn json_error(status: StatusCode, error: &str, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": error, "detail": detail });
    json(status, &body)
}

/// The body of [`json_error`], for answers written below hyper.
pub fn json_error_body(error: &str, detail: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": error, "detail": detail });
    serde_json::to_vec_pretty(&body).unwrap_or_else(|_| b"{}".to_vec())
}

/// A JSON answer of any serializable document.
pub fn json<T: serde::Serialize>(status: StatusCode, doc: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(doc).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
