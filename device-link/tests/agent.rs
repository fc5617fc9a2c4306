//! Device SDK over an in-memory byte stream, with a host link on the other end.
#![cfg(feature = "alloc")]

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::rc::Rc;

use common::{deliver, link, take_tx};
use device_link::{Agent, Config, Link, NackReason, OwnedEvent, Value};

/// The device's UART: reads what the host wrote, writes what the host will read.
#[derive(Clone, Default)]
struct Uart {
    to_device: Rc<RefCell<VecDeque<u8>>>,
    to_host: Rc<RefCell<Vec<u8>>>,
}

impl embedded_io::ErrorType for Uart {
    type Error = Infallible;
}
impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let mut q = self.to_device.borrow_mut();
        let n = buf.len().min(q.len());
        for b in buf.iter_mut().take(n) {
            *b = q.pop_front().unwrap_or(0);
        }
        Ok(n)
    }
}
impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(!self.to_device.borrow().is_empty())
    }
}
impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        self.to_host.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Runs both ends until quiet; returns (host events, device events).
fn run(
    host: &mut Link<Vec<u8>>,
    agent: &mut Agent<Uart, [u8; 256]>,
    uart: &Uart,
    now: u64,
) -> (Vec<OwnedEvent>, Vec<OwnedEvent>) {
    let (mut h, mut d) = (vec![], vec![]);
    for _ in 0..20 {
        host.tick(now);
        uart.to_device.borrow_mut().extend(take_tx(host));
        while let Some(ev) = agent.poll(now).unwrap() {
            d.push(ev.to_owned());
        }
        let out: Vec<u8> = std::mem::take(&mut *uart.to_host.borrow_mut());
        h.extend(deliver(host, now, &out, &mut || usize::MAX));
    }
    (h, d)
}

#[test]
fn agent_handles_messages_replies_and_sends() {
    let uart = Uart::default();
    let mut host = link("host", 4, 1024);
    let device_link = Link::new(&Config::new("dev-7", "fw-2"), [0u8; 256], [0u8; 256]).unwrap();
    let mut agent = Agent::new(uart.clone(), device_link);
    let seen = Rc::new(RefCell::new(vec![]));
    let log = seen.clone();
    agent.on("led", move |v| {
        log.borrow_mut().push(v.clone());
        None
    });
    agent.on("add", |v| {
        Some(Value::Int(v.get("a")?.as_i64()? + v.get("b")?.as_i64()?))
    });

    let (h, d) = run(&mut host, &mut agent, &uart, 0);
    assert!(agent.is_connected());
    assert!(matches!(&h[..], [OwnedEvent::Connected(p)] if p.device_id() == "dev-7"));
    assert!(matches!(&d[..], [OwnedEvent::Connected(_)]));

    let led = host.send("led", &Value::Bool(true).encode(), true).unwrap();
    let args = std::collections::BTreeMap::from([
        ("a".to_string(), Value::Int(2)),
        ("b".to_string(), Value::Int(40)),
    ]);
    let add_payload = Value::Map(args).encode();
    let add = host.send("add", &add_payload, true).unwrap();
    let bad = host.send("led", &[0xFF], true).unwrap();
    let unknown = host.send("nope", &[0xF6], true).unwrap();
    let (h, d) = run(&mut host, &mut agent, &uart, 10);
    assert_eq!(*seen.borrow(), vec![Value::Bool(true)]);
    assert_eq!(
        h,
        vec![
            OwnedEvent::Acked(led),
            OwnedEvent::Reply(add, Value::Int(42).encode()),
            OwnedEvent::Nacked(bad, NackReason::BadPayload)
        ]
    );
    // No handler: handed to the caller, who answers.
    let [OwnedEvent::Message { id, name, .. }] = &d[..] else {
        panic!("{d:?}")
    };
    assert_eq!((*id, name.as_str()), (unknown, "nope"));
    agent.link_mut().nack(*id, NackReason::NoHandler).unwrap();
    agent.send("temp", &Value::Float(21.5)).unwrap();
    let (h, _) = run(&mut host, &mut agent, &uart, 20);
    assert_eq!(h[0], OwnedEvent::Nacked(unknown, NackReason::NoHandler));
    assert!(
        matches!(&h[1], OwnedEvent::Message { name, payload, wants_ack: false, .. }
        if name == "temp" && Value::decode(payload) == Ok(Value::Float(21.5)))
    );
}

#[test]
fn agent_notices_a_vanished_host() {
    let uart = Uart::default();
    let mut host = link("host", 4, 1024);
    let mut agent = Agent::new(
        uart.clone(),
        Link::new(&Config::new("d", "f"), [0u8; 256], [0u8; 256]).unwrap(),
    );
    run(&mut host, &mut agent, &uart, 0);
    assert!(agent.is_connected());
    let mut events = vec![];
    for t in (0..5000).step_by(100) {
        while let Some(ev) = agent.poll(t).unwrap() {
            events.push(ev.to_owned());
        }
    }
    assert_eq!(
        events,
        vec![OwnedEvent::Disconnected(
            device_link::DisconnectReason::Timeout
        )]
    );
    assert!(matches!(agent.poll(6000), Ok(None)));
}
