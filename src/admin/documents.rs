//! The JSON documents of the admin API: explicit serde structs whose field names are the
//! contract of SPEC.md §6 (they come from the original brief). Handlers fill them from a
//! live snapshot; nothing here is a constant.

use serde::Serialize;

/// `GET /api/v1/secure-channel/status`: the pool as a whole ("Pool Status Response").
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// `host:port` of the relay.
    pub endpoint: String,
    /// TLS server name used for SNI and certificate verification.
    pub server_name: String,
    /// "healthy" (every connection usable), "degraded" (some usable) or "unavailable" (none).
    pub status: &'static str,
    /// True when at least one connection can take a request.
    pub pool_healthy: bool,
    /// Configured pool size (`pool.size`).
    pub pool_size: usize,
    /// Connections that are connected and whose breaker admits traffic.
    pub active_connections: usize,
    pub total_reconnects: u64,
    pub total_errors: u64,
    pub total_requests: u64,
    pub pool_p50_latency_ms: f64,
    pub pool_p95_latency_ms: f64,
    pub pool_p99_latency_ms: f64,
    pub connections: Vec<ConnectionStatus>,
    /// RFC 3339 UTC.
    pub last_updated: String,
}

/// One pool slot (`connections[]`, `/connections/{id}`). `connection_id` is stable across
/// re-dials of the slot (1-based); `reconnects` counts those re-dials.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub connection_id: u64,
    /// "h2" or "http/1.1"; null while not connected.
    pub protocol: Option<&'static str>,
    /// "connecting", "connected", "backoff" (waiting to re-dial) or "draining".
    pub state: &'static str,
    /// RFC 3339 UTC of the current TLS connection's handshake; null while not connected.
    pub connected_since: Option<String>,
    /// RFC 3339 UTC of the last request start or finish on this slot; null if none yet.
    pub last_activity: Option<String>,
    pub in_flight: u64,
    pub requests_total: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub ewma_latency_ms: f64,
    /// Round trip of the last HTTP/2 PING on this connection; null if none yet.
    pub last_ping_rtt_ms: Option<f64>,
    /// Connected and the breaker admits requests (closed or half-open).
    pub is_healthy: bool,
    /// "closed" (requests flow), "open" (none) or "half_open" (one probe).
    pub circuit_breaker: &'static str,
    pub breaker: BreakerStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakerStatus {
    pub state: &'static str,
    /// Why it last tripped: "consecutive_failures", "failure_rate", "probe_failed", "connect_failure"; null if never.
    pub trip_reason: Option<&'static str>,
    pub time_in_state_ms: f64,
    pub transitions: u64,
    /// RFC 3339 UTC; null if never transitioned.
    pub last_transition: Option<String>,
    /// Seconds until the next half-open probe while open; null otherwise.
    pub retry_after_seconds: Option<u64>,
}

/// `GET /api/v1/secure-channel/connections`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionStatus>,
}

/// `GET /api/v1/secure-channel/stats`: aggregates since start.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub requests: u64,
    pub errors: u64,
    /// errors / requests over the process lifetime, 0..=1.
    pub error_rate: f64,
    pub retries: u64,
    pub retry_budget_exhausted: u64,
    pub latency_ms: LatencySummary,
    /// Request body bytes sent to the relay since start, over every connection the pool has
    /// had; it only grows.
    pub bytes_sent: u64,
    /// Response body bytes received from the relay since start, likewise.
    pub bytes_received: u64,
    pub breaker_transitions: u64,
    pub reconnects: u64,
    pub uptime_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub avg: f64,
}

/// `GET /api/v1/secure-channel/health` and `/ready`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthDocument {
    /// "ok" or "unavailable".
    pub status: &'static str,
    pub reason: String,
    pub active_connections: usize,
    pub pool_size: usize,
}

/// Every error answer of both listeners: `{"error": "...", "detail": "..."}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDocument {
    pub error: String,
    pub detail: String,
}

/// `GET /api/v1/status`: the service summary ("Enhanced Bitcoin Sprint Status").
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// "sprint-sidecar".
    pub service: &'static str,
    /// "ok" (pool healthy, memory protection intact), "degraded" or "unavailable".
    pub status: &'static str,
    pub version: &'static str,
    /// RFC 3339 UTC, now.
    pub timestamp: String,
    /// Human form, e.g. "2h30m15s".
    pub uptime: String,
    pub uptime_seconds: f64,
    /// The document of `/api/v1/memory-protection/status` (see crate::hardening).
    pub memory_protection: serde_json::Value,
    pub secure_channel: SecureChannelSummary,
    pub performance: Performance,
}

#[derive(Debug, Clone, Serialize)]
pub struct SecureChannelSummary {
    /// "healthy", "degraded" or "unavailable" (same as PoolStatus::status).
    pub status: &'static str,
    pub pool_healthy: bool,
    pub active_connections: usize,
    /// Percent of requests that failed over the recent window (last 60 s).
    pub error_rate: f64,
    pub avg_latency_ms: f64,
    pub reconnects_total: u64,
    /// "closed" when every breaker is closed, "open" when all are open, else "partially_open".
    pub circuit_breaker_status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Performance {
    /// In-flight requests / total capacity (streams or h1 slots) of connected connections, percent.
    pub connection_pool_utilization: f64,
    pub avg_response_time_ms: f64,
    pub error_rate_percent: f64,
    /// Requests per second over the recent window.
    pub requests_per_second: f64,
    /// Resident set size from /proc/self/status.
    pub memory_usage_mb: f64,
    /// Process CPU over the last sampling interval, percent of one core.
    pub cpu_usage_percent: f64,
}
