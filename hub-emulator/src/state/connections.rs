//! Opening and closing the sessions of device connections: the one-connection-per-device
//! rule, CleanSession handling, subscriptions kept between connections, and asking a
//! connection to close. An `impl Shared` block above the state core.

use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::events::EventKind;
use crate::state::Shared;
use crate::state::c2d::release_in_flight;
use crate::state::session::{Session, SessionCmd, Subs};
use crate::util::iso8601;

impl Shared {
    /// Registers a live connection, dropping any previous one of the same device
    /// ("one active MQTT connection per device"). Returns CONNACK's session-present flag
    /// and the subscriptions the session starts with.
    pub fn open_session(
        &self,
        device_id: &str,
        conn_id: u64,
        token_expiry: u64,
        tx: mpsc::UnboundedSender<SessionCmd>,
        clean_session: bool,
    ) -> (bool, Subs) {
        let mut st = self.lock();
        if let Some(old) = st.sessions.remove(device_id) {
            const REASON: &str = "ConnectionForcefullyClosedOnNewConnection";
            let _ = old.tx.send(SessionCmd::Close(REASON.into()));
            // Logged here, before the new session's `connected`: the old connection's own
            // `close_session` finds its session gone and records nothing.
            self.events.record(
                device_id,
                EventKind::Disconnected {
                    reason: REASON.into(),
                },
            );
        }
        let now = iso8601(SystemTime::now());
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return (false, Subs::default());
        };
        release_in_flight(device, self);
        device.connection_state_updated = now.clone();
        device.last_activity = now;
        let (present, subs) = if clean_session {
            // CleanSession=1 ends the stored session and purges its C2D queue.
            let purged: Vec<_> = device.c2d.drain(..).collect();
            for m in &purged {
                self.c2d_outcome(device, m, "Purged");
            }
            device.persistent_subs = None;
            (false, Subs::default())
        } else {
            let subs = device.persistent_subs.unwrap_or_default();
            let present = device.persistent_subs.is_some();
            device.persistent_subs = Some(subs);
            (present, subs)
        };
        st.sessions.insert(
            device_id.to_string(),
            Session {
                conn_id,
                token_expiry,
                tx,
                subs,
            },
        );
        drop(st);
        self.changed();
        self.events
            .record(device_id, EventKind::Connected { clean_session });
        (present, subs)
    }

    /// Ends a connection's registration (if it is still the current one).
    pub fn close_session(&self, device_id: &str, conn_id: u64, reason: &str) {
        let mut st = self.lock();
        if st
            .sessions
            .get(device_id)
            .is_none_or(|s| s.conn_id != conn_id)
        {
            return;
        }
        st.sessions.remove(device_id);
        if let Some(device) = st.p.devices.get_mut(device_id) {
            release_in_flight(device, self);
            device.connection_state_updated = iso8601(SystemTime::now());
        }
        drop(st);
        self.events.record(
            device_id,
            EventKind::Disconnected {
                reason: reason.to_string(),
            },
        );
    }

    pub fn set_subs(&self, device_id: &str, conn_id: u64, subs: Subs) {
        let mut st = self.lock();
        match st.sessions.get_mut(device_id) {
            Some(s) if s.conn_id == conn_id => s.subs = subs,
            _ => return,
        }
        if let Some(d) =
            st.p.devices
                .get_mut(device_id)
                .filter(|d| d.persistent_subs.is_some())
        {
            d.persistent_subs = Some(subs);
        }
    }

    pub fn touch_activity(&self, device_id: &str) {
        if let Some(d) = self.lock().p.devices.get_mut(device_id) {
            d.last_activity = iso8601(SystemTime::now());
        }
    }

    /// Asks a device's connection to close (fault injection, deletion, token expiry).
    pub fn disconnect(&self, device_id: &str, reason: &str) -> bool {
        let st = self.lock();
        st.sessions
            .get(device_id)
            .map(|s| s.tx.send(SessionCmd::Close(reason.to_string())).is_ok())
            .unwrap_or(false)
    }
}
