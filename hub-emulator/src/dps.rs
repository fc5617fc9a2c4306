//! Device Provisioning Service: symmetric-key enrollments, the register / poll /
//! status operations shared by the REST and MQTT front ends, and assignment to the
//! emulated hub (protocol notes §3). The records these operations keep are in
//! `crate::state::provisioning`, below the state core.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::sas::{SasError, SasToken, derive_device_key};
use crate::state::Shared;
use crate::state::device::Device;
use crate::state::provisioning::{
    EnrollmentMatch, GroupEnrollment, IndividualEnrollment, Operation,
};
use crate::util::{b64, iso8601, new_uuid};

/// Seconds a client is told to wait before polling (`Retry-After`, `retry-after=`).
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

/// DPS-level failures, with the HTTP status and DPS error code to report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DpsError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("operation not found")]
    OperationNotFound,
    #[error("registration not found")]
    RegistrationNotFound,
}

impl DpsError {
    /// (HTTP status, DPS `errorCode`).
    pub fn status_and_code(&self) -> (u16, u32) {
        match self {
            DpsError::Unauthorized => (401, 401002),
            DpsError::BadRequest(_) => (400, 400004),
            DpsError::OperationNotFound | DpsError::RegistrationNotFound => (404, 404002),
        }
    }
}

/// Registration ids: ≤128 chars, alphanumerics and `- . _ :`, ending alphanumeric or `-`.
pub(crate) fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
        && id
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Shared {
    /// Checks a DPS SAS token for `registration_id` against the enrollments.
    pub fn dps_authenticate(
        &self,
        registration_id: &str,
        password: &str,
    ) -> Result<EnrollmentMatch, SasError> {
        let token = SasToken::parse(password)?;
        // The Python SDK omits `skn`; others send `registration`.
        if token
            .key_name
            .as_deref()
            .is_some_and(|n| n != "registration")
        {
            return Err(SasError::UnknownKeyName);
        }
        if !token.covers_hostless(&[&self.scope_id, "registrations", registration_id]) {
            return Err(SasError::WrongResource);
        }
        let now = self.now_secs();
        let st = self.lock();
        if let Some(e) = st.p.individual.get(&registration_id.to_lowercase()) {
            token.verify(&[&e.primary_key, &e.secondary_key], now)?;
            return Ok(EnrollmentMatch::Individual(e.clone()));
        }
        let mut result = Err(SasError::UnknownDevice);
        for g in st.p.groups.values() {
            let derived = [&g.primary_key, &g.secondary_key]
                .map(|k| derive_device_key(k, registration_id).unwrap_or_default());
            match token.verify(&[&derived[0], &derived[1]], now) {
                Ok(()) => {
                    let [primary_key, secondary_key] = derived;
                    return Ok(EnrollmentMatch::Group {
                        group_id: g.group_id.clone(),
                        primary_key,
                        secondary_key,
                    });
                }
                Err(SasError::Expired) => result = Err(SasError::Expired),
                Err(_) => {}
            }
        }
        result
    }

    /// Starts a registration; returns the `assigning` operation status body.
    pub fn dps_register(
        &self,
        registration_id: &str,
        enrollment: EnrollmentMatch,
        body: &[u8],
    ) -> Result<Value, DpsError> {
        let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| DpsError::BadRequest(format!("invalid JSON body: {e}")))?
        };
        if let Some(id) = body.get("registrationId")
            && id
                .as_str()
                .is_none_or(|id| !id.eq_ignore_ascii_case(registration_id))
        {
            return Err(DpsError::BadRequest(
                "registrationId in body does not match the URL/credentials".into(),
            ));
        }
        // DPS operation ids look like `5.316aac5bdc130deb.<uuid>`.
        let operation_id = format!("5.{}.{}", hex8(), new_uuid());
        let op = Operation {
            registration_id: registration_id.to_string(),
            enrollment,
            payload: body.get("payload").cloned().unwrap_or(Value::Null),
            result: None,
        };
        self.lock().dps_operations.insert(operation_id.clone(), op);
        Ok(json!({ "operationId": operation_id, "status": "assigning" }))
    }

    /// Polls an operation: the first poll performs the assignment, so the answer is
    /// always the final (`assigned`) status.
    pub fn dps_poll(&self, registration_id: &str, operation_id: &str) -> Result<Value, DpsError> {
        let op = {
            let st = self.lock();
            st.dps_operations
                .get(operation_id)
                .filter(|o| o.registration_id.eq_ignore_ascii_case(registration_id))
                .cloned()
        };
        let op = op.ok_or(DpsError::OperationNotFound)?;
        if let Some(result) = op.result {
            return Ok(result);
        }
        let state = self.assign(&op);
        let result = json!({ "operationId": operation_id, "status": "assigned", "registrationState": state });
        if let Some(o) = self.lock().dps_operations.get_mut(operation_id) {
            o.result = Some(result.clone());
        }
        Ok(result)
    }

    /// The last registration state (`POST /{scope}/registrations/{id}`).
    pub fn dps_registration(&self, registration_id: &str) -> Result<Value, DpsError> {
        self.lock()
            .p
            .registrations
            .get(&registration_id.to_lowercase())
            .cloned()
            .ok_or(DpsError::RegistrationNotFound)
    }

    /// Creates or updates the hub device for `op` and records the registration state.
    fn assign(&self, op: &Operation) -> Value {
        let now = iso8601(SystemTime::now());
        let (device_id, keys, group) = match &op.enrollment {
            EnrollmentMatch::Individual(e) => (
                e.device_id
                    .clone()
                    .unwrap_or_else(|| op.registration_id.clone()),
                (e.primary_key.clone(), e.secondary_key.clone()),
                None,
            ),
            EnrollmentMatch::Group {
                group_id,
                primary_key,
                secondary_key,
            } => (
                op.registration_id.clone(),
                (primary_key.clone(), secondary_key.clone()),
                Some(group_id.clone()),
            ),
        };
        let mut st = self.lock();
        let etag = st.next_etag();
        let created = match st.p.devices.get_mut(&device_id) {
            Some(d) => {
                d.primary_key = Some(keys.0);
                d.secondary_key = Some(keys.1);
                d.auth_type = "sas".into();
                d.etag = etag;
                false
            }
            None => {
                st.p.devices.insert(
                    device_id.clone(),
                    Device::new(&device_id, etag, Some(keys.0), Some(keys.1)),
                );
                true
            }
        };
        let key = op.registration_id.to_lowercase();
        let previous = st.p.registrations.get(&key);
        let created_time = previous
            .and_then(|p| p.get("createdDateTimeUtc"))
            .cloned()
            .unwrap_or_else(|| now.clone().into());
        let substatus = if previous.is_some() {
            "reprovisionedToInitialAssignment"
        } else {
            "initialAssignment"
        };
        let mut state = json!({
            "registrationId": op.registration_id,
            "createdDateTimeUtc": created_time,
            "assignedHub": self.hostname,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": substatus,
            "lastUpdatedDateTimeUtc": now,
            "etag": b64(format!("\"{}\"", new_uuid()).as_bytes()),
            "payload": op.payload,
        });
        if let Some(g) = group {
            state["symmetricKey"] = json!({ "enrollmentGroupId": g });
        }
        st.p.registrations.insert(key, state.clone());
        drop(st);
        self.changed();
        if created {
            self.events
                .record(&device_id, crate::events::EventKind::DeviceCreated);
        }
        state
    }

    pub fn add_individual(&self, e: IndividualEnrollment) {
        self.lock()
            .p
            .individual
            .insert(e.registration_id.to_lowercase(), e);
        self.changed();
    }

    pub fn add_group(&self, g: GroupEnrollment) {
        self.lock().p.groups.insert(g.group_id.clone(), g);
        self.changed();
    }
}

fn hex8() -> String {
    crate::util::random_bytes::<8>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules() {
        assert!(valid_registration_id("dev-1.a_b:c"));
        assert!(valid_registration_id("x-"));
        assert!(!valid_registration_id("x."));
        assert!(!valid_registration_id(""));
        assert!(!valid_registration_id("a/b"));
        assert!(!valid_registration_id(&"a".repeat(129)));
    }
}
