//! Running many tenants' agents: the configuration files ([`config`], [`manifest`]), the
//! management API with its console and Prometheus metrics ([`manage`]), the console's
//! short history of every agent's counters ([`history`]), and the versions kept from API
//! deploys ([`deployed`]); cluster mode on NATS JetStream ([`cluster`]); and the hub
//! emulator's page ([`hub_page`]), for `tether hub` and `tether demo`.

pub mod cluster;
pub mod config;
pub(crate) mod deployed;
pub mod history;
pub mod hub_page;
pub mod manage;
pub mod manifest;
pub(crate) mod web;
