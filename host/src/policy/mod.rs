//! Rules applied to what agents reach: allowed destinations ([`allowed_hosts`]), the
//! connect-time check of MQTT destinations ([`connect_guard`]), rates ([`rate`]) and the
//! TLS roots agents trust ([`tls`]). Capabilities consult these; none of them knows a
//! capability.

pub mod allowed_hosts;
pub(crate) mod connect_guard;
pub(crate) mod rate;
pub(crate) mod tls;
