//! The bearer token of the control API (`/emulator/...`): without it, any local process
//! or agent that reaches the HTTPS port could shift the hub's clock (so an expired token
//! passes) or mint DPS enrollments.
//!
//! Generated on first start into `<state dir>/control-token` (mode 0600 on unix) and read
//! back on later starts, so it stays valid across restarts like the policy keys; or set
//! by the embedding program (`HubConfig::control_token`), and then not written anywhere.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::HubError;

/// File name of the token in the state directory.
pub(crate) const FILE: &str = "control-token";

/// The control API's token and where a refused client is told to find it.
pub(crate) struct ControlToken {
    value: String,
    /// The file it is stored in; `None` when the embedding program set it.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlToken")
            .field("value", &"<redacted>")
            .field("path", &self.path)
            .finish()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `Authorization: Bearer ...` header.
    Missing,
    /// A bearer token, but not this one.
    Wrong,
}

impl ControlToken {
    /// The token set by the embedding program: one word of printable ASCII.
    pub fn given(value: &str) -> Result<Self, HubError> {
        if !is_token(value) {
            return Err(HubError::Config(
                "the control token must be non-empty printable ASCII without spaces".into(),
            ));
        }
        Ok(ControlToken {
            value: value.to_string(),
            path: None,
        })
    }

    /// Reads `<dir>/control-token`, or writes a new random one (32 bytes, hex) there.
    pub fn load_or_create(dir: &Path) -> Result<Self, HubError> {
        let path = dir.join(FILE);
        let value = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let value = text.trim();
                if !is_token(value) {
                    return Err(HubError::State {
                        path,
                        message: "not a control token (one word of printable ASCII); \
                                  delete the file to have a new one generated"
                            .into(),
                    });
                }
                value.to_string()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let value = generate();
                write_private(&path, &value)?;
                value
            }
            Err(e) => return Err(HubError::io(&path, e)),
        };
        Ok(ControlToken {
            value,
            path: Some(path),
        })
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Checks an `Authorization` header value (`""` when absent). The scheme is matched
    /// case-insensitively (RFC 9110 §11.1); the token in constant time, over SHA-256
    /// digests so that not even its length shows in the timing.
    pub fn check(&self, authorization: &str) -> Result<(), Refusal> {
        let given = authorization
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(Refusal::Missing)?;
        let (a, b) = (Sha256::digest(given), Sha256::digest(&self.value));
        if bool::from(a.as_slice().ct_eq(b.as_slice())) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }

    /// What a refused client needs to do, for the 401 body.
    pub fn hint(&self, refusal: Refusal) -> String {
        let what = match refusal {
            Refusal::Missing => "no control token given",
            Refusal::Wrong => "wrong control token",
        };
        let source = match &self.path {
            Some(path) => format!(
                "the token is printed at start and stored in {}",
                path.display()
            ),
            None => "the token is set by the program that started the emulator".to_string(),
        };
        format!("{what}: the control API needs `Authorization: Bearer <control token>`; {source}")
    }
}

/// One word of printable ASCII, so it fits an HTTP header and a shell variable as is.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

fn generate() -> String {
    crate::util::random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `value` to `path`, readable by the owner only (unix), via a temporary file and
/// a rename so that a crash never leaves a half-written token.
fn write_private(path: &Path, value: &str) -> Result<(), HubError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may have other permissions; `mode` applies only to new files.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HubError::io(&tmp, e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| HubError::io(&tmp, e))?;
    file.write_all(format!("{value}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| HubError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HubError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> ControlToken {
        ControlToken::given("s3cret").unwrap()
    }

    #[test]
    fn bearer_scheme_any_case_right_token_only() {
        let t = token();
        assert_eq!(t.check("Bearer s3cret"), Ok(()));
        assert_eq!(t.check("bearer  s3cret "), Ok(()));
        assert_eq!(t.check("BEARER s3cret"), Ok(()));
        assert_eq!(t.check(""), Err(Refusal::Missing));
        assert_eq!(t.check("s3cret"), Err(Refusal::Missing));
        assert_eq!(t.check("Basic s3cret"), Err(Refusal::Missing));
        assert_eq!(t.check("Bearer"), Err(Refusal::Missing));
        assert_eq!(t.check("Bearer s3cre"), Err(Refusal::Wrong));
        assert_eq!(t.check("Bearer s3cret2"), Err(Refusal::Wrong));
        assert_eq!(t.check("Bearer "), Err(Refusal::Missing));
    }

    #[test]
    fn given_tokens_must_fit_a_header() {
        assert!(ControlToken::given("").is_err());
        assert!(ControlToken::given("two words").is_err());
        assert!(ControlToken::given("line\n").is_err());
        assert!(ControlToken::given("ok-token_1").is_ok());
    }

    #[test]
    fn generated_once_then_read_back_owner_only() {
        let dir = std::env::temp_dir().join(format!("tether-hub-ctl-{}", crate::util::new_uuid()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = ControlToken::load_or_create(&dir).unwrap();
        assert_eq!(first.value().len(), 64);
        let second = ControlToken::load_or_create(&dir).unwrap();
        assert_eq!(first.value(), second.value());
        assert_eq!(second.path(), Some(dir.join(FILE).as_path()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join(FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.join(FILE), "\n").unwrap();
        assert!(matches!(
            ControlToken::load_or_create(&dir),
            Err(HubError::State { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
