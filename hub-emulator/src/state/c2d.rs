//! Cloud-to-device queues: enqueueing, delivery with IoT Hub's lock and redelivery,
//! completion, expiry and dead-lettering, and the outcome of each message (an event and,
//! if asked for, a feedback record). An `impl Shared` block above the state core;
//! the message encoding itself is in `crate::messages`.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;

use crate::events::EventKind;
use crate::messages::{
    C2D_LOCK, C2D_MAX_DELIVERY_COUNT, C2dMessage, C2dRequest, MAX_C2D_BYTES, MAX_C2D_QUEUE,
};
use crate::state::device::Device;
use crate::state::session::SessionCmd;
use crate::state::{ControlError, Shared};

impl Shared {
    /// Enqueues a C2D message (fails at 50 queued, like IoT Hub's 403004).
    pub fn enqueue_c2d(&self, device_id: &str, req: C2dRequest) -> Result<String, ControlError> {
        if req.body.len() > MAX_C2D_BYTES {
            return Err(ControlError::MessageTooLarge);
        }
        let now = SystemTime::now();
        let mut st = self.lock();
        let device =
            st.p.devices
                .get_mut(device_id)
                .ok_or_else(|| ControlError::DeviceNotFound(device_id.into()))?;
        expire_c2d(device, now, self);
        if device.c2d.len() >= MAX_C2D_QUEUE {
            return Err(ControlError::QueueFull(device_id.into()));
        }
        let msg = C2dMessage::new(req, now);
        // The properties travel in the topic, whose length is a u16 in MQTT.
        if msg.topic(device_id).len() > usize::from(u16::MAX) {
            return Err(ControlError::MessageTooLarge);
        }
        let id = msg.message_id.clone();
        device.c2d.push_back(msg);
        if let Some(s) = st.sessions.get(device_id) {
            let _ = s.tx.send(SessionCmd::C2dWake);
        }
        drop(st);
        self.metrics.c2d_enqueued();
        self.changed();
        Ok(id)
    }

    /// The end of a C2D message (`Success`, `Expired`, `DeliveryCountExceeded`,
    /// `Purged`): an event, and a feedback record if its `iothub-ack` asks for one.
    pub fn c2d_outcome(&self, device: &Device, message: &C2dMessage, status: &'static str) {
        self.feedback.offer(
            &device.id,
            &device.generation_id,
            &message.message_id,
            &message.ack,
            status,
        );
        self.events.record(
            &device.id,
            EventKind::C2dFeedback {
                message_id: message.message_id.clone(),
                status,
            },
        );
    }

    /// Marks deliverable C2D messages in flight and returns their PUBLISH packets.
    /// `alloc` hands out packet ids; delivery needs a C2D subscription.
    pub fn take_c2d(
        &self,
        device_id: &str,
        conn_id: u64,
        mut alloc: impl FnMut() -> u16,
    ) -> Vec<Publish> {
        let mut st = self.lock();
        let st = &mut *st;
        if !st
            .sessions
            .get(device_id)
            .is_some_and(|s| s.conn_id == conn_id && s.subs.c2d)
        {
            return Vec::new();
        }
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return Vec::new();
        };
        let now = SystemTime::now();
        expire_c2d(device, now, self);
        // A delivery whose lock expired without PUBACK is abandoned: the message goes out
        // again (a late PUBACK of the old delivery completes nothing), or is dead-lettered
        // after the maximum delivery count.
        let lock_expired =
            |m: &C2dMessage| m.in_flight.is_some() && m.locked_until.is_some_and(|t| t <= now);
        let (dead, kept): (VecDeque<_>, VecDeque<_>) = device
            .c2d
            .drain(..)
            .partition(|m| lock_expired(m) && m.delivery_count >= C2D_MAX_DELIVERY_COUNT);
        device.c2d = kept;
        for m in &dead {
            self.c2d_outcome(device, m, "DeliveryCountExceeded");
        }
        let lock = self
            .test_faults
            .lock()
            .ok()
            .and_then(|f| f.c2d_lock)
            .unwrap_or(C2D_LOCK);
        let mut out = Vec::new();
        for m in device
            .c2d
            .iter_mut()
            .filter(|m| m.in_flight.is_none() || lock_expired(m))
        {
            let pkid = alloc();
            m.in_flight = Some(pkid);
            m.locked_until = Some(now + lock);
            m.delivery_count += 1;
            let mut p = Publish::new(m.topic(device_id), QoS::AtLeastOnce, m.body.clone());
            p.pkid = pkid;
            p.dup = m.delivery_count > 1;
            out.push(p);
        }
        out
    }

    /// Time until the earliest lock of a delivered C2D message of `device_id` expires.
    pub fn next_c2d_lock_expiry(&self, device_id: &str) -> Option<Duration> {
        let st = self.lock();
        let now = SystemTime::now();
        st.p.devices
            .get(device_id)?
            .c2d
            .iter()
            .filter(|m| m.in_flight.is_some())
            .filter_map(|m| m.locked_until)
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
            .min()
    }

    /// PUBACK of a C2D delivery: completes the message.
    pub fn complete_c2d(&self, device_id: &str, pkid: u16) {
        let mut st = self.lock();
        let Some(device) = st.p.devices.get_mut(device_id) else {
            return;
        };
        if let Some(pos) = device.c2d.iter().position(|m| m.in_flight == Some(pkid))
            && let Some(m) = device.c2d.remove(pos)
        {
            self.c2d_outcome(device, &m, "Success");
            drop(st);
            self.changed();
        }
    }
}

/// A disconnect puts delivered-but-unacknowledged C2D messages back in the queue
/// (dead-lettering those delivered too often).
pub(super) fn release_in_flight(device: &mut Device, shared: &Shared) {
    let (dead, kept): (VecDeque<_>, VecDeque<_>) = device
        .c2d
        .drain(..)
        .partition(|m| m.in_flight.is_some() && m.delivery_count >= C2D_MAX_DELIVERY_COUNT);
    device.c2d = kept;
    for m in device.c2d.iter_mut() {
        m.in_flight = None;
        m.locked_until = None;
    }
    for m in &dead {
        shared.c2d_outcome(device, m, "DeliveryCountExceeded");
    }
}

fn expire_c2d(device: &mut Device, now: SystemTime, shared: &Shared) {
    let (expired, kept): (VecDeque<_>, VecDeque<_>) = device
        .c2d
        .drain(..)
        .partition(|m| m.expired(now) && m.in_flight.is_none());
    device.c2d = kept;
    for m in &expired {
        shared.c2d_outcome(device, m, "Expired");
    }
}
