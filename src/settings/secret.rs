//! Secrets: values that must never be printed, and where they are read from.
//!
//! Owns: the [`Secret`] newtype and reading secrets from files and systemd credentials.
//! Must never: put a secret's value in Debug output, Display output or an error message.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{SettingsError, err};

/// A secret string. Debug and Display print `[redacted]`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value, and registers it to be scrubbed from every excerpt of a foreign answer
    /// ([`crate::domain::scrub_secrets`]): an upstream that echoes a request can quote any of
    /// them.
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        crate::domain::register_secret(&value);
        Secret(value)
    }

    /// The value. Call it only where the secret is sent to paymennt.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The last four characters, for `check-config` ("…c3f1"), when the value is long enough
    /// that they give nothing away.
    pub fn hint(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() >= 16 {
            let tail: String = chars[chars.len() - 4..].iter().collect();
            format!("…{tail}")
        } else {
            "[redacted]".to_owned()
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Accepts any scalar, so a mistyped secret (a bare number in TOML) can never produce a type
/// error that quotes the value.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl Visitor<'_> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Reads a secret from a file: the whole file, with one trailing newline (or CRLF) removed.
///
/// # Errors
///
/// The message names the file and the OS error, never the contents.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path)
        .map_err(|error| format!("cannot read '{}': {error}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("'{}' is not UTF-8 text", path.display()))?;
    let trimmed = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if trimmed.is_empty() {
        return Err(format!("'{}' is empty", path.display()));
    }
    Ok(Secret::new(trimmed))
}

/// The prefix of a Standard Webhooks signing secret.
pub const SIGNING_SECRET_PREFIX: &str = "whsec_";

/// The key bytes of a Standard Webhooks signing secret: `whsec_` + standard base64 (padded, as
/// every reference library decodes it) of 24 to 64 bytes, the range the specification
/// recommends.
///
/// # Errors
///
/// What is wrong with it, never the value.
pub fn signing_key(value: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let Some(encoded) = value.strip_prefix(SIGNING_SECRET_PREFIX) else {
        return Err(format!("it does not start with '{SIGNING_SECRET_PREFIX}'"));
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("the part after '{SIGNING_SECRET_PREFIX}' is not base64"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("it decodes to {} bytes, not 24 to 64", key.len()));
    }
    Ok(key)
}

/// The path of a systemd credential (`LoadCredential=NAME:...`), if `$CREDENTIALS_DIRECTORY` is
/// set and the credential exists.
pub fn systemd_credential(name: &str) -> Option<PathBuf> {
    let directory = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = Path::new(&directory).join(name);
    path.exists().then_some(path)
}

pub(super) fn resolve_secret(
    key: &str,
    value: Option<&Secret>,
    file: Option<&Path>,
    credential: &str,
) -> Result<Secret, SettingsError> {
    if let Some(value) = value {
        if value.expose().is_empty() {
            return Err(err(format!("'{key}' is empty")));
        }
        return Ok(value.clone());
    }
    if let Some(file) = file {
        return read_secret_file(file).map_err(|problem| err(format!("{key}_file: {problem}")));
    }
    if let Some(path) = systemd_credential(credential) {
        return read_secret_file(&path)
            .map_err(|problem| err(format!("systemd credential '{credential}': {problem}")));
    }
    let env = format!("PAYWATCH_{}", key.to_uppercase().replace('.', "__"));
    Err(err(format!(
        "'{key}' is not set\n\nset it in the config file, as '{key}_file', in {env}, \
         or as the systemd credential '{credential}'"
    )))
}

pub(super) fn resolve_optional_secret(
    key: &str,
    value: Option<&Secret>,
    file: Option<&Path>,
    credential: &str,
) -> Result<Option<Secret>, SettingsError> {
    if value.is_none() && file.is_none() && systemd_credential(credential).is_none() {
        return Ok(None);
    }
    resolve_secret(key, value, file, credential).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("sk_live_very_secret_value");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert!(!secret.hint().contains("very"));
    }

    #[test]
    fn a_signing_secret_is_whsec_and_base64_of_24_to_64_bytes() {
        // The example of the Standard Webhooks specification: 24 bytes.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        assert_eq!(key.len(), 24);
        assert_eq!(
            signing_key("whsec_dGhpcyBpcyBhIHRlc3Qga2V5IG9mIDI1IGJ5dGVzIQ==").map(|k| k.len()),
            Ok(31),
            "padded"
        );
        for (value, problem) in [
            (
                "whsec_dGhpcyBpcyBhIHRlc3Qga2V5IG9mIDI1IGJ5dGVzIQ",
                "is not base64",
            ),
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "does not start with 'whsec_'",
            ),
            ("whsec_not*base64*at*all*really!!", "is not base64"),
            ("whsec_c2hvcnQ=", "decodes to 5 bytes, not 24 to 64"),
            ("whsec_", "decodes to 0 bytes"),
        ] {
            let error = signing_key(value).expect_err(value);
            assert!(error.contains(problem), "{value}: {error}");
            assert!(
                !error.contains("MfKQ9r8") && !error.contains("c2hvcnQ"),
                "{error}"
            );
        }
        let long = format!("whsec_{}", "A".repeat(88));
        assert!(
            signing_key(&long)
                .expect_err("66 bytes")
                .contains("66 bytes")
        );
    }

    #[test]
    fn secret_file_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "abc\n").expect("write");
        assert_eq!(
            read_secret_file(&path).map(|s| s.expose().to_owned()),
            Ok("abc".into())
        );
        std::fs::write(&path, "").expect("write");
        assert!(read_secret_file(&path).is_err());
        let missing = dir.path().join("missing");
        let error = read_secret_file(&missing).expect_err("missing file");
        assert!(error.contains("missing"), "{error}");
    }
}
