//! Operator views read straight from the pinned maps (no agent needed): `services`,
//! `backends`, `stats` and the live `top`; and the changes sent to a running agent through its
//! admin socket (`register`, `deregister`, `drain`).

pub mod admin;
pub mod top;
pub mod views;

pub use views::{Output, backends, parse_interval, services, stats};
