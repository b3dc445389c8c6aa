//! Backend health: active checks (`active`). Passive detection is the kernel's count of failed
//! connects, read by the control loop (`reconcile::Executor::passive_failures`), which ejects
//! through `HealthMonitor::force_unhealthy`.

mod active;

pub use active::{Health, HealthMonitor, Target, Transition};
