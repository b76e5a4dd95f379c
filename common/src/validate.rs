//! Request validation that reports every problem at once, each with the field and the offending value, in one
//! message format every crate shares and front ends parse back ([`ValidationErrors::parse`]).
//!
//! The format of one problem is `field: "value" problem`: the field's path (`disks[1].path`), the value quoted and
//! escaped as Rust's `{:?}` does (so a value may hold `; `, `: ` or quotes), then the problem in words. A problem
//! with no value to show (a missing field) is `field: problem`; a secret's is `field: <redacted> problem`. Problems
//! are joined by `; `, which problem texts therefore never contain.
//!
//! Messages are bounded, because a caller controls the values and protocols limit what a message may hold (gRPC
//! clients refuse metadata over 8-16 KiB): a value longer than [`MAX_SHOWN_VALUE`] is shown as its start, `…` and
//! its size (`"aaaa…" (1048576 bytes) is too long`, which reads back as the same text), a field path or problem
//! text is cut likewise, and a list shows at most [`MAX_SHOWN_PROBLEMS`] problems (and no more than about
//! [`MESSAGE_BUDGET`] bytes of them), then how many more there are. The problems themselves are kept whole.

use std::fmt;
use std::fmt::Write as _;

/// The longest value shown whole, in characters as quoted (escapes count); longer ones are cut to about half.
pub const MAX_SHOWN_VALUE: usize = 100;
/// The longest field path shown whole (a label key is part of its field's path).
pub const MAX_SHOWN_FIELD: usize = 100;
/// The longest problem text shown whole (a problem may quote what a parser said of the input).
pub const MAX_SHOWN_PROBLEM: usize = 300;
/// How many problems a message lists at most; the rest are counted.
pub const MAX_SHOWN_PROBLEMS: usize = 8;
/// About how many bytes the listed problems of one message take at most: once past it, the rest are counted.
pub const MESSAGE_BUDGET: usize = 800;

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
    /// Bounded: a long value is shown as its start and its size, a long problem text is cut.
    pub fn without_field(&self) -> String {
        let problem = shorten(&self.problem, MAX_SHOWN_PROBLEM);
        if self.value.is_empty() {
            problem.into_owned()
        } else if self.value == REDACTED {
            format!("{REDACTED} {problem}")
        } else {
            format!("{} {problem}", quote_bounded(&self.value))
        }
    }

    /// The field path as a message shows it: control characters escaped, cut when longer than
    /// [`MAX_SHOWN_FIELD`].
    pub fn shown_field(&self) -> String {
        let escaped: String = self.field.chars().flat_map(escape).collect();
        shorten(&escaped, MAX_SHOWN_FIELD).into_owned()
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.shown_field(), self.without_field())
    }
}

/// A control character escaped as `{:?}` would, anything else as it is.
fn escape(c: char) -> impl Iterator<Item = char> {
    let escaped = c.is_control().then(|| c.escape_debug());
    let plain = (!c.is_control()).then_some(c);
    escaped.into_iter().flatten().chain(plain)
}

/// `value` quoted as `{:?}` quotes it; when that is longer than [`MAX_SHOWN_VALUE`], its start (escapes counted),
/// `…` inside the quotes, and the whole value's size after them: `"aaaa…" (1048576 bytes)`.
fn quote_bounded(value: &str) -> String {
    let quoted = |text: &str| format!("{text:?}");
    if value.len() <= MAX_SHOWN_VALUE && quoted(value).len() <= MAX_SHOWN_VALUE + 2 {
        return quoted(value);
    }
    let mut shown = 0;
    let end = value
        .char_indices()
        .find(|&(_, c)| {
            shown += c.escape_debug().count();
            shown > MAX_SHOWN_VALUE / 2
        })
        .map_or(value.len(), |(i, _)| i);
    if end == value.len() {
        return quoted(value);
    }
    format!("{} ({} bytes)", quoted(&format!("{}…", &value[..end])), value.len())
}

/// `text` when it has at most `max` bytes, else its start (cut at a character boundary) and `…`.
pub fn shorten(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// Every problem found in a request, in field order; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

/// At most [`MAX_SHOWN_PROBLEMS`] problems (fewer when they pass [`MESSAGE_BUDGET`] bytes; always the first),
/// then `and N more problems`.
impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = String::new();
        let mut count = 0;
        for error in &self.0 {
            if count == MAX_SHOWN_PROBLEMS || (count > 0 && shown.len() >= MESSAGE_BUDGET) {
                break;
            }
            if count > 0 {
                shown.push_str("; ");
            }
            write!(shown, "{error}")?;
            count += 1;
        }
        f.write_str(&shown)?;
        match self.0.len() - count {
            0 => Ok(()),
            1 => f.write_str("; and 1 more problem"),
            more => write!(f, "; and {more} more problems"),
        }
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
    fn long_values_are_shown_as_their_start_and_size_and_read_back_as_shown() {
        let huge = "x".repeat(1 << 20);
        let error = FieldError::new("labels.big", &huge, "is not a valid label value");
        let text = error.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(text.starts_with(r#"labels.big: "xxxx"#), "{text}");
        assert!(text.ends_with(r#"…" (1048576 bytes) is not a valid label value"#), "{text}");
        let parsed = ValidationErrors::parse(&text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].field, "labels.big");
        assert_eq!(parsed[0].to_string(), text, "what was shown reads back as the same text");

        // Escapes count: a value of control characters is cut by its quoted length; a multi-byte character is never
        // split.
        let bells = FieldError::new("name", "\u{7}".repeat(500), "contains control characters").to_string();
        assert!(bells.len() < 200, "{bells}");
        assert!(bells.contains(r#"\u{7}…" (500 bytes)"#), "{bells}");
        let wide = FieldError::new("name", "é".repeat(5000), "is too long").to_string();
        assert!(wide.contains(r#"é…" (10000 bytes)"#), "{wide}");
        assert!(wide.len() < 300, "{wide}");
        // Values up to the limit are shown whole.
        let path = format!("/{}", "p".repeat(MAX_SHOWN_VALUE - 1));
        let error = FieldError::new("kernel", &path, "does not exist");
        assert_eq!(error.to_string(), format!("kernel: {path:?} does not exist"));
    }

    #[test]
    fn long_fields_and_problems_are_cut_and_control_characters_in_fields_escaped() {
        let key = "k".repeat(10_000);
        let error = FieldError::new(format!("labels.{key}"), &key, format!("is bad: {}", "why ".repeat(1000)));
        let text = error.to_string();
        assert!(text.len() < MAX_SHOWN_FIELD + MAX_SHOWN_VALUE + MAX_SHOWN_PROBLEM + 40, "{} bytes", text.len());
        assert_eq!(FieldError::new("labels.a\nb", "v", "is bad").to_string(), r#"labels.a\nb: "v" is bad"#);
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcdef", 4), "a…");
        assert_eq!(shorten("ééé", 5), "é…");
        assert_eq!(shorten("ééé", 6), "ééé");
        assert_eq!(shorten("éééé", 7), "éé…");
    }

    #[test]
    fn a_message_lists_a_bounded_number_of_problems_and_counts_the_rest() {
        let many = ValidationErrors(
            (0..200).map(|i| FieldError::new(format!("disks[{i}].path"), "/nope", "does not exist")).collect(),
        );
        let text = many.to_string();
        assert!(text.ends_with(&format!("; and {} more problems", 200 - MAX_SHOWN_PROBLEMS)), "{text}");
        assert!(text.starts_with(r#"disks[0].path: "/nope" does not exist; disks[1].path"#), "{text}");
        let parsed = ValidationErrors::parse(&text);
        assert_eq!(parsed.len(), MAX_SHOWN_PROBLEMS + 1);
        assert_eq!(parsed[MAX_SHOWN_PROBLEMS].field, "", "the count is free text");
        // Big problems stop the list sooner, but the first is always there.
        let big = ValidationErrors(
            (0..5).map(|i| FieldError::new(format!("labels.l{i}"), "v".repeat(1000), "x".repeat(1000))).collect(),
        );
        let text = big.to_string();
        assert!(text.len() < MESSAGE_BUDGET + 600, "{} bytes", text.len());
        assert!(text.starts_with("labels.l0: "), "{text}");
        assert!(text.ends_with(" more problems"), "{text}");
        let nine = (0..=MAX_SHOWN_PROBLEMS).map(|i| FieldError::new(format!("f{i}"), "", "x"));
        let nine = ValidationErrors(nine.collect());
        assert!(nine.to_string().ends_with("; and 1 more problem"), "{nine}");
    }

    #[test]
    fn first_field_and_one() {
        let error = ValidationErrors::one("action", "X", "must be REBOOT or SHUTDOWN");
        assert_eq!(error.first_field(), "action");
        assert_eq!(ValidationErrors(Vec::new()).first_field(), "");
    }
}
