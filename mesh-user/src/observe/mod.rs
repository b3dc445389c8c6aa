//! What operators read: Prometheus metrics (the agent's and the kernel's counters) and the HTTP
//! endpoint serving them with `/healthz` and `/readyz`.

pub mod healthcheck;
pub mod heartbeat;
pub mod http;
pub mod metrics;
