//! Request validation that reports every problem at once, each with the field and the offending value, in one
//! message format every crate shares and front ends parse back ([`ValidationErrors::parse`]).
//!
//! The format of one problem is `field: "value" problem`: the field's path (`disks[1].path`), the value quoted and
//! escaped as Rust's `{:?}` does (so a value may hold `; `, `: ` or quotes), then the problem in words. A problem
//! with no value to show (a missing field) is `field: problem`; a secret's is `field: <redacted> problem`. Problems
//! are joined by `; `, which problem texts therefore never contain.

use std::fmt;

/// The value recorded for a secret field (a password, cloud-init user data): shown unquoted, never the secret.
pub const REDACTED: &str = "<redacted>";

/// One problem with one field: `name: "a/b" contains '/'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field in the request, e.g. `disks[1].path`, `ports[2].vlan.tag`.
    pub field: String,
    /// The offending value as the caller gave it (unquoted); empty when there is none to show (a missing field),
    /// [`REDACTED`] for secrets.
    pub value: String,
    /// What is wrong with it, e.g. `is outside 1..=4094`. Never contains `; `.
    pub problem: String,
}

impl FieldError {
    /// A problem with `field`, whose value is shown with its `Display`.
    pub fn new(field: impl Into<String>, value: impl fmt::Display, problem: impl Into<String>) -> Self {
        Self { field: field.into(), value: value.to_string(), problem: problem.into() }
    }

    /// A problem with a secret field, recorded without its value.
    pub fn secret(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), value: REDACTED.to_owned(), problem: problem.into() }
    }

    /// The problem without the field's name, `"5000" is outside 1..=4094`: what a form shows under the field.
    pub fn without_field(&self) -> String {
        if self.value.is_empty() {
            self.problem.clone()
        } else if self.value == REDACTED {
            format!("{REDACTED} {}", self.problem)
        } else {
            format!("{:?} {}", self.value, self.problem)
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.without_field())
    }
}

/// Every problem found in a request, in field order; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    /// A single-problem error, for checks made outside `validate` (duplicate names, say).
    pub fn one(field: impl Into<String>, value: impl fmt::Display, problem: impl Into<String>) -> Self {
        Self(vec![FieldError::new(field, value, problem)])
    }

    /// The first offending field, for protocols that carry one (gRPC's `BadRequest`).
    pub fn first_field(&self) -> &str {
        self.0.first().map_or("", |e| e.field.as_str())
    }

    /// Reads a message in this format back into its problems: what a front end does with the message of an
    /// `INVALID_ARGUMENT` reply to put each problem under the field it names.
    ///
    /// Never fails: a part that names no field (free text from an older node, say) comes back with an empty
    /// `field` and the text as its `problem`.
    pub fn parse(message: &str) -> Vec<FieldError> {
        let mut problems = Vec::new();
        let mut rest = message.trim();
        while !rest.is_empty() {
            let (problem, after) = parse_one(rest);
            if !problem.field.is_empty() || !problem.problem.is_empty() {
                problems.push(problem);
            }
            rest = after.trim_start();
        }
        problems
    }
}

/// Parses one problem off the front of `text`; returns it and what follows its `; `.
fn parse_one(text: &str) -> (FieldError, &str) {
    fn free_text(text: &str) -> (FieldError, &str) {
        let (problem, rest) = split_problem(text);
        (FieldError { field: String::new(), value: String::new(), problem: problem.to_owned() }, rest)
    }
    let Some((field, after)) = text.split_once(": ") else {
        return free_text(text);
    };
    // A field path has no spaces and no `;`; anything else is free text that happens to hold `: `.
    if field.is_empty() || field.contains([' ', ';']) {
        return free_text(text);
    }
    let (value, after) = if after.starts_with('"') {
        match unquote(after) {
            Some((value, after)) => (value, after.strip_prefix(' ').unwrap_or(after)),
            None => return free_text(text),
        }
    } else if let Some(after) = after.strip_prefix(REDACTED) {
        (REDACTED.to_owned(), after.strip_prefix(' ').unwrap_or(after))
    } else {
        (String::new(), after)
    };
    let (problem, rest) = split_problem(after);
    (FieldError { field: field.to_owned(), value, problem: problem.to_owned() }, rest)
}

fn split_problem(text: &str) -> (&str, &str) {
    match text.split_once("; ") {
        Some((problem, rest)) => (problem, rest),
        None => (text, ""),
    }
}

/// Reads a string quoted the way `{:?}` quotes it from the front of `text`; returns it unescaped and what follows
/// the closing quote. `None` if it is not closed or holds an escape `{:?}` never writes.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut chars = text.char_indices();
    chars.next().filter(|&(_, c)| c == '"')?;
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => {
                let (_, escape) = chars.next()?;
                value.push(match escape {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    '0' => '\0',
                    '\\' | '"' | '\'' => escape,
                    'u' => {
                        chars.next().filter(|&(_, c)| c == '{')?;
                        let mut hex = String::new();
                        loop {
                            let (_, c) = chars.next()?;
                            if c == '}' {
                                break;
                            }
                            hex.push(c);
                        }
                        char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?
                    }
                    _ => return None,
                });
            }
            c => value.push(c),
        }
    }
    None
}

/// Collects problems while a request is checked, then becomes the result.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    /// Records a problem with `field`, whose offending value is shown with its `Display`.
    pub fn add(&mut self, field: impl Into<String>, value: impl fmt::Display, problem: impl Into<String>) {
        self.0.push(FieldError::new(field, value, problem));
    }

    /// Records `check`'s problem, if any, under `field`.
    pub fn check(&mut self, field: impl Into<String>, value: impl fmt::Display, check: Result<(), String>) {
        if let Err(problem) = check {
            self.add(field, value, problem);
        }
    }

    /// Records a problem with a secret field without echoing the secret.
    pub fn secret(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError::secret(field, problem));
    }

    /// Adds every problem of `errors` (a nested part checked on its own).
    pub fn extend(&mut self, errors: ValidationErrors) {
        self.0.extend(errors.0);
    }

    /// Whether nothing was found wrong so far.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` if no problem was recorded, else every problem in the order found.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(list: &[(&str, &str, &str)]) -> ValidationErrors {
        ValidationErrors(list.iter().map(|&(f, v, p)| FieldError::new(f, v, p)).collect())
    }

    #[test]
    fn one_format_for_every_kind_of_value() {
        let mut p = Problems::default();
        p.add("vlan", 5000, "is outside 1..=4094");
        p.add("kernel", "", "is required when there are no disks");
        p.secret("users[0].password", "is too short");
        p.add("name", "a/b", "contains '/'");
        assert_eq!(
            p.into_result().unwrap_err().to_string(),
            concat!(
                r#"vlan: "5000" is outside 1..=4094; kernel: is required when there are no disks; "#,
                r#"users[0].password: <redacted> is too short; name: "a/b" contains '/'"#
            )
        );
    }

    #[test]
    fn no_problems_is_ok() {
        assert_eq!(Problems::default().into_result(), Ok(()));
        let mut p = Problems::default();
        p.check("mtu", 1500, Ok(()));
        assert!(p.is_empty());
        p.check("mtu", 10, Err("is below 68".into()));
        assert_eq!(p.into_result().unwrap_err().to_string(), r#"mtu: "10" is below 68"#);
    }

    #[test]
    fn parse_reads_back_what_display_wrote() {
        let original = errors(&[
            ("vcpus", "0", "is outside 1..=255"),
            ("disks[1]", "", "needs a path or a volume"),
            ("kernel.cmdline", "console=ttyS0; rm -rf: \"quoted\"\n\t\\ é \u{7}", "contains control characters"),
            ("labels.a/b", "a/b", "is not a valid label key"),
            ("password", REDACTED, "is too short"),
            ("name", "", "is empty"),
        ]);
        assert_eq!(ValidationErrors::parse(&original.to_string()), original.0);
    }

    #[test]
    fn parse_keeps_free_text_whole() {
        let parsed = ValidationErrors::parse("the switch did not answer; vlan: \"5\" is taken");
        assert_eq!(
            parsed,
            vec![FieldError::new("", "", "the switch did not answer"), FieldError::new("vlan", "5", "is taken"),]
        );
        let parsed = ValidationErrors::parse("connecting to ovsdb: no such file");
        assert_eq!(parsed, vec![FieldError::new("", "", "connecting to ovsdb: no such file")]);
        assert!(ValidationErrors::parse("  ").is_empty());
    }

    #[test]
    fn parse_survives_broken_quotes() {
        for message in ["name: \"unterminated", "name: \"bad \\q escape\" x", "name: \"\\u{zz}\" x", ": x", ";;; "] {
            let parsed = ValidationErrors::parse(message);
            assert!(!parsed.is_empty() || message.trim().is_empty() || message == ";;; ", "{message:?}");
        }
    }

    #[test]
    fn without_field_is_what_a_form_shows() {
        assert_eq!(
            FieldError::new("vlan", 5000, "is outside 1..=4094").without_field(),
            "\"5000\" is outside 1..=4094"
        );
        assert_eq!(FieldError::new("kernel", "", "is required").without_field(), "is required");
        assert_eq!(FieldError::secret("password", "is too short").without_field(), "<redacted> is too short");
    }

    #[test]
    fn first_field_and_one() {
        let error = ValidationErrors::one("action", "X", "must be REBOOT or SHUTDOWN");
        assert_eq!(error.first_field(), "action");
        assert_eq!(ValidationErrors(Vec::new()).first_field(), "");
    }
}
