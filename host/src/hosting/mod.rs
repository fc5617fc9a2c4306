//! Running many tenants' agents: the configuration files ([`config`], [`manifest`]), the
//! management API with its dashboard and Prometheus metrics ([`manage`]), and the versions
//! kept from API deploys ([`deployed`]).

pub mod config;
pub(crate) mod deployed;
pub mod manage;
pub mod manifest;
