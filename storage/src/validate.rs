//! Request validation that reports every problem at once, each with the field and the offending value.

use std::fmt;

/// One problem with one field: `name: "a/b" contains '/'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path in the request, e.g. `users[1].name`.
    pub field: String,
    /// The offending value, quoted as Rust would, or `<redacted>` for secrets.
    pub value: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.field, self.value, self.problem)
    }
}

/// Every problem found in a request; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid(pub Vec<FieldError>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects problems while a request is checked.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<FieldError>);

impl Problems {
    pub fn push(&mut self, field: impl Into<String>, value: impl fmt::Debug, problem: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), value: format!("{value:?}"), problem: problem.into() });
    }

    /// Records a problem with a secret field without echoing the secret.
    pub fn push_secret(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), value: "<redacted>".into(), problem: problem.into() });
    }

    pub fn into_result(self) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid(self.0))
        }
    }
}

/// The longest volume or image name: leaves room for an extension and a temporary suffix within NAME_MAX (255).
pub const MAX_NAME_LEN: usize = 128;

/// Checks a name that becomes a file name: not empty, at most [`MAX_NAME_LEN`] bytes, no `/`, no NUL or other
/// control characters, not `.`/`..` or hidden (a leading `.` is reserved for temporary files), and no whitespace at
/// either end.
pub(crate) fn check_name(problems: &mut Problems, field: &str, value: &str) {
    let before = problems.0.len();
    if value.is_empty() {
        problems.push(field, value, "is empty");
    } else if value.len() > MAX_NAME_LEN {
        problems.push(field, value, format!("is {} bytes long, more than {MAX_NAME_LEN}", value.len()));
    }
    if value.contains('/') {
        problems.push(field, value, "contains '/'");
    }
    if value == ".." || value.contains("..") {
        problems.push(field, value, "contains '..'");
    } else if value.starts_with('.') {
        problems.push(field, value, "starts with '.'");
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        problems.push(field, value, format!("contains the control character {c:?}"));
    }
    if problems.0.len() == before && value.trim() != value {
        problems.push(field, value, "starts or ends with whitespace");
    }
}

/// [`check_name`] for a single name, as a `Result`.
pub fn validate_name(field: &str, value: &str) -> Result<(), Invalid> {
    let mut p = Problems::default();
    check_name(&mut p, field, value);
    p.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in ["web-1", "disk_0.qcow2", "Debian 12 cloud", "a"] {
            validate_name("name", n).unwrap();
        }
    }

    #[test]
    fn bad_names_name_field_value_and_problem() {
        let err = validate_name("name", "a/b").unwrap_err();
        assert_eq!(err.to_string(), r#"name: "a/b" contains '/'"#);
        let err = validate_name("volume", "..").unwrap_err();
        assert_eq!(err.to_string(), r#"volume: ".." contains '..'"#);
        let err = validate_name("name", "x\u{7}").unwrap_err();
        assert_eq!(err.to_string(), r#"name: "x\u{7}" contains the control character '\u{7}'"#);
        assert!(validate_name("name", "").is_err());
        assert!(validate_name("name", ".hidden").is_err());
        assert!(validate_name("name", " pad").is_err());
        assert!(validate_name("name", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn every_problem_is_reported() {
        let err = validate_name("name", "../\n").unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
