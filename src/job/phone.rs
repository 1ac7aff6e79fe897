//! Phone numbers: what libphonenumber calls valid, normalised to E.164, and masked wherever
//! they are printed.

use std::fmt::{self, Write as _};

use super::MAX_PHONE_CHARS;
use super::fields::shown;
use crate::telemetry::mask_phone;

/// A phone number libphonenumber calls valid, normalised to E.164 (`+14155552671`).
///
/// `Debug` and `Display` print it masked (`+14*******71`) so that it reaches no log by accident;
/// [`PhoneNumber::e164`] gives the real number for Genesys and the result event.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses an E.164 number, or a national one with `default_region` (ISO 3166 alpha-2, either
    /// case). Messages name the job fields (`phoneNumber`, `defaultRegion`) and show the number
    /// masked.
    pub fn parse(raw: &str, default_region: Option<&str>) -> Result<Self, String> {
        let region = default_region.map(parse_region).transpose()?;
        if raw.chars().count() > MAX_PHONE_CHARS {
            return Err(format!(
                "phoneNumber is longer than {MAX_PHONE_CHARS} characters"
            ));
        }
        let invalid = || {
            format!(
                "phoneNumber {:?} is not a valid phone number (expected E.164 like +14155552671, \
                 or a national number with defaultRegion)",
                mask_phone(raw)
            )
        };
        // Digits and the usual separators only: this is all a dialable number needs, and it keeps
        // letters, extensions and URIs (which libphonenumber would try to interpret) out.
        let digits = raw.strip_prefix('+').unwrap_or(raw);
        if !digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')' | '/'))
        {
            return Err(invalid());
        }
        // The parser has panicked on odd input in past releases (rust-phonenumber #32, #43); a job
        // must never take the worker down, so a panic here is a rejection like any other.
        let parsed = std::panic::catch_unwind(|| {
            let number = phonenumber::parse(region, raw).ok()?;
            if number.extension().is_some() || !phonenumber::is_valid(&number) {
                return None;
            }
            let mut e164 = String::new();
            // Formatting fails only for a country code without metadata, which `is_valid` excludes.
            write!(
                e164,
                "{}",
                phonenumber::format(&number).mode(phonenumber::Mode::E164)
            )
            .ok()?;
            Some(e164)
        });
        match parsed {
            Ok(Some(e164)) => Ok(Self(e164)),
            _ => Err(invalid()),
        }
    }

    /// The real number, E.164: for Genesys and the result event, never for logs.
    pub fn e164(&self) -> &str {
        &self.0
    }

    /// The real number, E.164 (the same as [`PhoneNumber::e164`]).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number masked for logs (`+14*******71`).
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PhoneNumber").field(&self.masked()).finish()
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// `defaultRegion`: an ISO 3166 alpha-2 code libphonenumber has metadata for.
fn parse_region(raw: &str) -> Result<phonenumber::country::Id, String> {
    let upper = raw.to_ascii_uppercase();
    let known = upper.len() == 2 && upper.bytes().all(|b| b.is_ascii_uppercase());
    known
        .then(|| upper.parse::<phonenumber::country::Id>().ok())
        .flatten()
        .ok_or_else(|| {
            format!(
                "defaultRegion {} is not a known region (expected an ISO 3166 alpha-2 code like GB)",
                shown(raw)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::RejectionKind;
    use crate::job::test_support::*;

    #[test]
    fn numbers_are_normalised_to_e164() {
        let job = parse(with("phoneNumber", "+1 (415) 555-2671".into())).unwrap();
        assert_eq!(job.phone_number.e164(), "+14155552671");
        assert_eq!(job.phone_number.as_str(), "+14155552671");
        let national = PhoneNumber::parse("(415) 555-2671", Some("US")).unwrap();
        assert_eq!(national.e164(), "+14155552671");
        // An E.164 number needs no region, and a region does not change it.
        assert_eq!(
            PhoneNumber::parse("+442071838750", Some("US"))
                .unwrap()
                .e164(),
            "+442071838750"
        );
    }

    #[test]
    fn bad_numbers_and_regions_are_rejected() {
        for (number, region) in [
            ("12345", None),
            ("4155552671", None),
            ("+1415555", None),
            ("+14155552671 ext. 12", None),
            ("tel:+14155552671", None),
            ("+1 415 FLOWERS", None),
            ("  2 22#:", None),
            ("003-836-4618x3001", Some("CH")),
            ("07700 900123", Some("ZZ")),
            ("07700 900123", Some("GBR")),
        ] {
            let rejection = rejected(
                with("phoneNumber", number.into())
                    .as_object()
                    .map(|o| {
                        let mut o = o.clone();
                        if let Some(region) = region {
                            o.insert("defaultRegion".into(), region.into());
                        }
                        serde_json::Value::Object(o)
                    })
                    .unwrap(),
            );
            assert_eq!(rejection.kind, RejectionKind::InvalidField, "{number}");
            let field = if region.is_some_and(|r| r != "CH") {
                "defaultRegion"
            } else {
                "phoneNumber"
            };
            assert!(
                rejection.message.starts_with(field),
                "{}",
                rejection.message
            );
            assert_eq!(rejection.job_id.as_deref(), Some("job-1"));
        }
        let rejection = rejected(with("phoneNumber", "12345".into()));
        assert_eq!(
            rejection.message,
            "phoneNumber \"*****\" is not a valid phone number (expected E.164 like +14155552671, \
             or a national number with defaultRegion)"
        );
    }

    #[test]
    fn messages_show_numbers_masked() {
        let rejection = rejected(with("phoneNumber", "+1415555267".into()));
        assert!(
            rejection.message.contains("+14******67"),
            "{}",
            rejection.message
        );
        assert!(!rejection.message.contains("\"+1415555267\""));
    }

    #[test]
    fn phone_numbers_print_masked() {
        let number = PhoneNumber::parse("+14155552671", None).unwrap();
        assert_eq!(format!("{number:?}"), "PhoneNumber(\"+14*******71\")");
        assert_eq!(number.to_string(), "+14*******71");
        let job = parse(minimal()).unwrap();
        assert!(!format!("{job:?}").contains("5552671"));
    }
}
