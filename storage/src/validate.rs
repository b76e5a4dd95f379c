//! Request validation that reports every problem at once, each with the field and the offending value: the shared
//! types of `qx-common` (one message format for every crate), and the name check of files this crate creates.

pub use qx_common::FieldError;
pub(crate) use qx_common::Problems;
/// Every problem found in a request; never empty. `qx_common`'s type under this crate's name for it.
pub use qx_common::ValidationErrors as Invalid;

/// The longest volume or image name: leaves room for an extension and a temporary suffix within NAME_MAX (255).
pub const MAX_NAME_LEN: usize = 128;

/// Checks a name that becomes a file name: not empty, at most [`MAX_NAME_LEN`] bytes, no `/`, no NUL or other
/// control characters, not `.`/`..` or hidden (a leading `.` is reserved for temporary files), and no whitespace at
/// either end.
pub(crate) fn check_name(problems: &mut Problems, field: &str, value: &str) {
    let before = problems.0.len();
    if value.is_empty() {
        problems.add(field, value, "is empty");
    } else if value.len() > MAX_NAME_LEN {
        problems.add(field, value, format!("is {} bytes long, more than {MAX_NAME_LEN}", value.len()));
    }
    if value.contains('/') {
        problems.add(field, value, "contains '/'");
    }
    if value == ".." || value.contains("..") {
        problems.add(field, value, "contains '..'");
    } else if value.starts_with('.') {
        problems.add(field, value, "starts with '.'");
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        problems.add(field, value, format!("contains the control character {c:?}"));
    } else if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
        problems.add(field, value, format!("contains the invisible character {c:?}"));
    }
    if problems.0.len() == before && value.trim() != value {
        problems.add(field, value, "starts or ends with whitespace");
    }
}

/// Zero-width and bidirectional formatting characters: a name holding one shows as another name (`\u{202e}`
/// reverses what follows it).
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
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
