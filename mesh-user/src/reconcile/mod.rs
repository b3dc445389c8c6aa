//! From desired state to the maps: `plan` (pure diff), `repair` (pure resync diff), the model of
//! what the maps hold (`applied`) and the `Executor` that owns the maps and runs the writes.

pub mod applied;
pub mod executor;
pub mod plan;
pub mod repair;
pub mod resync;

pub use applied::Applied;
pub use executor::Executor;
