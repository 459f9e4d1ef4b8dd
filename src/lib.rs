//! sprint-sidecar: a sidecar proxy that carries an application's plain HTTP over a small
//! pool of warm, measured TLS connections to the Bitcoin Sprint relay, adds the relay
//! credential so the app never holds it, and keeps every secret in locked, wiped memory.
//!
//! ```text
//!  app ──plain HTTP──▶ proxy (listener.address) ──▶ upstream ──▶ pool ──TLS──▶ relay
//!                                                      │          N warm connections (h2 streams
//!                                                      │          or HTTP/1.1), each with latency
//!                                                      │          window, EWMA and circuit breaker
//!                                                      └─ retry policy + budget, credential
//!  operator / Prometheus / kubelet ──▶ admin (admin.address): status JSON, metrics, probes, docs
//!  token, mTLS key ──▶ secret::SecureBuffer (mlock, guard pages, PROT_NONE, wiped) ◀── hardening
//! ```
//!
//! Arrows point down only: `main → app → {proxy, admin} → upstream → {pool, connection,
//! breaker, backoff, retry, latency, metrics, tls} → secret`. The leaves (`secret`,
//! `latency`, `metrics`, `breaker`, `backoff`, `retry`) touch no sockets.

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod busy_poll;
pub mod config;
pub mod credential;
pub mod demo;
pub mod event_loops;
pub mod hardening;
pub mod latency;
pub mod log_limit;
pub mod loop_yield;
pub mod metrics;
pub mod proxy;
pub mod response;
pub mod secret;
pub mod shutdown;
pub mod status_cli;
pub mod tls;
pub mod upstream;
