//! A Rust version of the Electric Imp AzureIoTHub 5.1.0 agent library: provisioning
//! (DPS), the device registry, and a device client with telemetry, cloud-to-device
//! messages, device twins, direct methods and SAS token auto-refresh. Built only on the
//! host's `mqtt`, `http` and `timers` capabilities.
//!
//! # From the Squirrel library to Rust
//!
//! | AzureIoTHub 5.1.0 | Rust |
//! |---|---|
//! | `AzureIoTHub.ConnectionString.Parse(str)` | [`ConnectionString::parse`] |
//! | `AzureIoTHub.SharedAccessSignature(uri, keyName, key, expiry)` | [`SharedAccessSignature::new`] (`Display` is `toString()`) |
//! | `AzureIoTHub.Authorization.encodeUri` | [`encode_uri`] |
//! | `AzureIoTHub.Registry(connectionString)` | [`Registry::new`] |
//! | `registry.create([deviceInfo][, cb])` | [`Registry::create`]`(Option<Device>, cb)` |
//! | `registry.update(deviceInfo[, cb])` | [`Registry::update`] |
//! | `registry.remove(deviceId[, cb])` | [`Registry::remove`] |
//! | `registry.get(deviceId, cb)` | [`Registry::get`] |
//! | `registry.list(cb)` | [`Registry::list`] |
//! | registry callback `(err, response)`, `err = {response, message}` | `Result<Device \| Vec<Device> \| (), RegistryError { response, message }>` |
//! | `AzureIoTHub.Device([deviceInfo])` | [`Device::new`]`(Option<Value>)`, e.g. `Some(json!({..}))` |
//! | `device.connectionString(hostname)` | [`Device::connection_string`] |
//! | `device.getBody()` | [`Device::body`] |
//! | `AzureIoTHub.DPS(scopeId, registrationId, deviceKey)` | [`Dps::new`] (+ [`Dps::with_endpoint`] for an emulator) |
//! | `dps.register(onCompleted)` | [`Dps::register`] |
//! | `dps.getConnectionString(onCompleted)` | [`Dps::get_connection_string`] |
//! | `onCompleted(error, response, connectionString)` | `FnOnce(i32, Option<serde_json::Value>, Option<String>)` |
//! | `AzureIoTHub.Message(message[, properties])` | [`Message::new`], [`Message::with_properties`] |
//! | `message.getProperties()` / `message.getBody()` | [`Message::properties`] / [`Message::body`] |
//! | `AzureIoTHub.DirectMethodResponse(status[, body])` | [`DirectMethodResponse::new`] |
//! | `AzureIoTHub.Client(cs[, onConnected][, onDisconnected][, options])` | [`Client::new`]`(cs, on_connected, on_disconnected, ClientOptions)` |
//! | `client.connect()` / `disconnect()` / `isConnected()` | [`Client::connect`] / [`Client::disconnect`] / [`Client::is_connected`] |
//! | `client.sendMessage(msg[, onSent])` | [`Client::send_message`] |
//! | `client.enableIncomingMessages(onReceive[, onDone])`; with `null` | [`Client::enable_incoming_messages`]; [`Client::disable_incoming_messages`] |
//! | `client.enableTwin(onRequest[, onDone])`; with `null` | [`Client::enable_twin`]; [`Client::disable_twin`] |
//! | `client.retrieveTwinProperties(onRetrieved)` | [`Client::retrieve_twin_properties`] (`(err, reported, desired)`) |
//! | `client.updateTwinProperties(props[, onUpdated])` | [`Client::update_twin_properties`]`(json!({..}) or Map, cb)` |
//! | `client.enableDirectMethods(onMethod[, onDone])`; with `null` | [`Client::enable_direct_methods`]; [`Client::disable_direct_methods`] |
//! | `reply(data[, onReplySent])` | [`MethodReply::send`] |
//! | `client.setDebug(value)` | [`Client::set_debug`] |
//! | options `qos`, `keepAlive`, `twinsTimeout`, `dMethodsTimeout`, `maxPendingTwinRequests`, `maxPendingSendRequests`, `tokenTTL`, `tokenAutoRefresh` | [`ClientOptions`] `qos`, `keep_alive`, `twins_timeout`, `d_methods_timeout`, `max_pending_twin_requests`, `max_pending_send_requests`, `token_ttl`, `token_auto_refresh` (+ `port`) |
//! | `AZURE_CLIENT_ERROR_*`, `AZURE_DPS_ERROR_NOT_REGISTERED`, `AZURE_ERROR_GENERAL` | [`ERROR_NOT_CONNECTED`] ... [`ERROR_GENERAL`] |
//!
//!
//! # Beyond 5.1.0
//!
//! Added beside the mirror, off unless asked for, so that 5.1.0's documented behaviour
//! stays the default:
//!
//! | what | Rust | 5.1.0 |
//! |---|---|---|
//! | Reconnect by itself, backoff with jitter, features enabled again | [`ClientOptions::reconnect`] ([`Reconnect`]) | lost connection reported (1100), the agent decides |
//! | Durable outbox: accepted = kept until IoT Hub acknowledges it, across crashes and host restarts; a `$.mid` per message | [`ClientOptions::outbox`], [`Client::outbox_len`] | messages in flight are lost |
//! | X.509 devices: a TLS client certificate instead of a SAS token, for `x509=true` connection strings (self-signed by thumbprint or CA-signed) | [`ClientOptions::client_certificate`], [`ClientCertificate`] | keys only |
//! | The recommended settings: QoS 1, reconnect, outbox | [`ClientOptions::resilient`] | - |
//! | Body plus properties checked against 256 KB before sending | 1006 [`ERROR_MESSAGE_TOO_LARGE`] | IoT Hub closes the connection |
//! | Outbox quota used up | 1007 [`ERROR_OUTBOX_FULL`] | - |
//! | Why the connection failed or was lost, in words | [`Client::last_disconnect_cause`] | a code only |
//! | async/await: every call an `async fn` returning `Result<_, AzureError>`, method handlers that return their response, one twin type | [`DeviceClient`], [`Dps::provision`], `Registry::{create,get,update,list,remove}_device` | callbacks |
//! | Registry errors of requests that got no answer, in words (`cannot connect to ...; is the server up ...`) | [`RegistryError::message`], [`RegistryError::code`] | `Error 7` |
//!
//! ```no_run
//! use tether_guest::azure_iot_hub::{Client, ClientOptions, Message};
//! use tether_guest::server;
//!
//! let client = Client::new(
//!     "HostName=myhub.azure-devices.net;DeviceId=dev1;SharedAccessKey=a2V5",
//!     |err| server::log(format!("connected: {err}")),
//!     |err| server::log(format!("disconnected: {err}")),
//!     ClientOptions::resilient(),
//! );
//! client.connect();
//! // Accepted at once, connected or not; sent when the hub is reachable, never lost.
//! client.send_message(Message::new("22.5"), |err, _| if err != 0 { server::error(format!("not accepted: {err}")) });
//! ```
//!
//! Optional callbacks are closures that may ignore their arguments (`|_, _| ()`).
//! Where the library threw on an argument of the wrong type, Rust's types rule it out.
//!
//! # Where this follows the documentation rather than 5.1.0's code
//!
//! - Calls made while the connection is being established get 1004, as documented
//!   ("the connection is still being established"); 5.1.0's code answered 1000.
//! - Connection strings split each pair at the first `=`, keeping base64 padding (5.1.0
//!   split at every `=`, then appended one).
//! - `disconnect()` while connecting, when the connection then fails: the client ends
//!   disconnected and `on_disconnected(0)` reports the disconnect done (5.1.0 stayed stuck
//!   "disconnecting" with no callback).
//! - The token is refreshed shortly before expiry (2 min, or a tenth of a short TTL), as
//!   documented; 5.1.0 waited for the exact expiry.
//! - The MQTT username is `{host}/{deviceId}/?api-version=...` and the token's resource is
//!   `{host}/devices/{deviceId}`, as IoT Hub documents them (5.1.0 omitted the `?` and
//!   signed a resource with the api-version appended).
//! - Twin operations time out `twins_timeout` after their publish completed, to the
//!   second; 5.1.0's shared whole-second timer could fire up to a period late.
//! - Tokens list their fields as `sr, sig, se, skn`, byte for byte what Microsoft's SDKs
//!   produce (5.1.0: `sr, sig, skn, se`; IoT Hub accepts both).
//! - `Registry::update` of a device that carries an `etag` sends it as `If-Match`, so a
//!   concurrent change gives IoT Hub's 412 instead of being overwritten (5.1.0 always sent
//!   `If-Match: *`, which a device without etag still does).
//! - Registry errors found before sending (missing device id) come through the callback
//!   during a later event, never inside the call.

mod client;
mod connection_string;
mod device;
mod device_client;
mod direct_method_response;
mod dps;
mod message;
mod registry;
mod shared_access_signature;

pub use client::{Client, ClientOptions, MethodReply, Reconnect};
pub use device_client::{AzureError, DeviceClient, Twin, TwinProperties};
/// The X.509 identity of [`ClientOptions::client_certificate`].
pub use crate::mqtt::ClientCertificate;
pub use connection_string::ConnectionString;
pub use device::Device;
pub use direct_method_response::DirectMethodResponse;
pub use dps::{DEFAULT_DPS_ENDPOINT, Dps, Provisioned};
pub use message::Message;
pub use registry::{ERROR_MISSING_DEVICE_ID, ERROR_MISSING_DEVICE_INFO, Registry, RegistryError};
pub use shared_access_signature::{SasError, SharedAccessSignature, derive_device_key, encode_uri, hmac_base64};

/// IoT Hub API version of the MQTT username and the registry REST calls.
pub const API_VERSION: &str = "2016-11-14";
/// DPS REST API version.
pub const DPS_API_VERSION: &str = "2018-09-01-preview";

/// The client is not connected.
pub const ERROR_NOT_CONNECTED: i32 = 1000;
/// The client is already connected.
pub const ERROR_ALREADY_CONNECTED: i32 = 1001;
/// The feature is not enabled.
pub const ERROR_NOT_ENABLED: i32 = 1002;
/// The feature is already enabled.
pub const ERROR_ALREADY_ENABLED: i32 = 1003;
/// The operation is not allowed now (connecting, disconnecting, too many pending, ...).
pub const ERROR_OP_NOT_ALLOWED_NOW: i32 = 1004;
/// The operation timed out.
pub const ERROR_OP_TIMED_OUT: i32 = 1005;
/// DPS: the device is not registered.
pub const ERROR_NOT_REGISTERED: i32 = 1010;
/// General error: unexpected response, parse error, unexpected disconnection.
pub const ERROR_GENERAL: i32 = 1100;
/// The message (body plus properties) is larger than IoT Hub's 256 KB
/// ([`MAX_MESSAGE_BYTES`]); nothing was sent and the connection is untouched. Beyond
/// 5.1.0, where IoT Hub closes the whole connection instead.
pub const ERROR_MESSAGE_TOO_LARGE: i32 = 1006;
/// The outbox is full (the agent's queue quota, `limits.queue_bytes`); the message was not
/// accepted. Beyond 5.1.0: see [`ClientOptions::outbox`].
pub const ERROR_OUTBOX_FULL: i32 = 1007;
/// Largest device-to-cloud message IoT Hub takes: body plus property names and values.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Default MQTT QoS.
pub const DEFAULT_QOS: u8 = 0;
/// Default keep-alive, s.
pub const DEFAULT_KEEP_ALIVE: u16 = 60;
/// Default twins timeout, s.
pub const DEFAULT_TWINS_TIMEOUT: u32 = 10;
/// Default pending twin updates.
pub const DEFAULT_TWIN_UPD_PARAL_REQS: usize = 3;
/// Default pending sends.
pub const DEFAULT_MSG_SEND_PARAL_REQS: usize = 3;
/// Default token TTL, s.
pub const DEFAULT_TOKEN_TTL: u64 = 86400;
/// Default direct method reply timeout, s.
pub const DEFAULT_DMETHODS_TIMEOUT: u32 = 30;
