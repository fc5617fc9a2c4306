//! DPS records the hub state keeps: symmetric-key enrollments and registrations in
//! progress. Plain data below the state core, which holds it; the DPS operations that
//! read and change it are in `crate::dps`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A DPS individual enrollment (symmetric key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IndividualEnrollment {
    pub registration_id: String,
    pub device_id: Option<String>,
    pub primary_key: String,
    pub secondary_key: String,
}

/// A DPS enrollment group (symmetric key); device keys are derived per registration id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupEnrollment {
    pub group_id: String,
    pub primary_key: String,
    pub secondary_key: String,
}

/// The enrollment a registration authenticated against.
#[derive(Debug, Clone)]
pub(crate) enum EnrollmentMatch {
    Individual(IndividualEnrollment),
    Group {
        group_id: String,
        primary_key: String,
        secondary_key: String,
    },
}

/// A registration in progress: `assigning` until first polled, then done.
#[derive(Debug, Clone)]
pub(crate) struct Operation {
    pub registration_id: String,
    pub enrollment: EnrollmentMatch,
    pub payload: Value,
    pub result: Option<Value>,
}
