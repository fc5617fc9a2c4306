//! The agent's connect options as rumqttc's, checked against its policy.

use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, TlsConfiguration, Transport};

use super::{Policy, REQUEST_QUEUE, qos};
use crate::bindings::mqtt::{ConnectOptions, MqttError};
use crate::kit::log::{Level, Logger};
use crate::policy::allowed_hosts::Reach;

/// rumqttc's options for the agent's `o`, if its policy allows the destination.
pub(super) fn mqtt_options(policy: &Policy, log: &Logger, o: &ConnectOptions) -> Result<MqttOptions, MqttError> {
    let (tls, rest) = if let Some(rest) = o.url.strip_prefix("tcp://") {
        (false, rest)
    } else if let Some(rest) = o.url.strip_prefix("ssl://") {
        (true, rest)
    } else {
        return Err(MqttError::InvalidArgument);
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| MqttError::InvalidArgument)?)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let id_len = o.client_id.chars().count();
    if host.is_empty() || !(1..=255).contains(&id_len) {
        return Err(MqttError::InvalidArgument);
    }
    let scheme = if tls { "mqtts" } else { "mqtt" };
    let Some(reach) = policy.allowed_hosts.check(scheme, host, port) else {
        log.write(Level::Error, &format!("mqtt: {scheme}://{host}:{port} is not an allowed destination"));
        return Err(MqttError::NotAllowed);
    };
    let limit = policy.message_bytes;
    let mut m = MqttOptions::new(o.client_id.clone(), host, port);
    m.set_keep_alive(Duration::from_secs(o.keep_alive.into()))
        .set_clean_session(o.clean_session)
        .set_request_channel_capacity(REQUEST_QUEUE)
        // Room for the topic and header around a payload at the limit.
        .set_max_packet_size(limit + 64 * 1024, limit + 64 * 1024);
    if o.username.is_some() || o.password.is_some() {
        m.set_credentials(o.username.clone().unwrap_or_default(), o.password.clone().unwrap_or_default());
    }
    if let Some(will) = &o.will {
        if will.payload.len() > limit || will.topic.is_empty() {
            return Err(MqttError::InvalidArgument);
        }
        m.set_last_will(LastWill::new(will.topic.clone(), will.payload.clone(), qos(will.qos)?, will.retain));
    }
    if tls {
        let identity = o.client_certificate.as_ref().map(|c| (c.cert_pem.as_str(), c.key_pem.as_str()));
        let config = policy.network.tls.client_config(o.ca_pem.as_deref(), identity).map_err(|e| {
            log.write(Level::Error, &format!("mqtt: {e}"));
            MqttError::InvalidArgument
        })?;
        m.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    } else if o.client_certificate.is_some() {
        log.write(Level::Error, "mqtt: a client certificate needs an ssl:// URL");
        return Err(MqttError::InvalidArgument);
    }
    if reach == Reach::PublicOnly {
        m.set_proxy(policy.network.guard.clone());
    }
    Ok(m)
}
