//! Running many tenants' agents: the configuration files ([`config`], [`manifest`]), the
//! management API with its console and Prometheus metrics ([`manage`]), the console's
//! short history of every agent's counters ([`history`]), and the versions kept from API
//! deploys ([`deployed`]).

pub mod config;
pub(crate) mod deployed;
pub mod history;
pub mod manage;
pub mod manifest;
