//! Operator views read straight from the pinned maps (no agent needed): `services`,
//! `backends`, `stats` and the live `top`.

pub mod top;
pub mod views;

pub use views::{Output, backends, parse_interval, services, stats};
