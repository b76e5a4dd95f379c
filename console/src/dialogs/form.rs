//! A form of labelled fields, shared by the dialogs: focus movement, editing, inline errors per field, and
//! mapping qx-node's `INVALID_ARGUMENT` messages onto the fields they name.
//!
//! Editing is deliberately simple, as on a server console: typing appends, Backspace removes the last character,
//! Ctrl-U clears the field. Choice fields change with ←/→ or Space.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Longest value a text field takes: longer than any address, URL or token an operator types by hand.
pub const MAX_FIELD_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    /// Shown as one `*` per character (join tokens).
    Secret,
    /// One of the options, stored in the field's value.
    Choice(&'static [&'static str]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The proto field name: qx-node's validation messages start with it.
    pub name: &'static str,
    pub label: &'static str,
    pub kind: FieldKind,
    pub value: String,
    /// Shown after the value, e.g. `0 = untagged`.
    pub hint: &'static str,
    /// Why the value is refused, shown under the field.
    pub error: Option<String>,
    /// Disabled fields are skipped by focus and validation (e.g. the address in DHCP mode).
    pub enabled: bool,
}

impl Field {
    pub fn text(name: &'static str, label: &'static str, value: impl Into<String>) -> Self {
        Self { name, label, kind: FieldKind::Text, value: value.into(), hint: "", error: None, enabled: true }
    }

    pub fn secret(name: &'static str, label: &'static str) -> Self {
        Self { kind: FieldKind::Secret, ..Self::text(name, label, "") }
    }

    pub fn choice(name: &'static str, label: &'static str, options: &'static [&'static str], value: &str) -> Self {
        let value = options.iter().find(|o| **o == value).or(options.first()).copied().unwrap_or_default();
        Self { kind: FieldKind::Choice(options), ..Self::text(name, label, value) }
    }

    pub fn with_hint(self, hint: &'static str) -> Self {
        Self { hint, ..self }
    }

    /// The value as the view shows it: secrets masked.
    pub fn shown(&self) -> String {
        match self.kind {
            FieldKind::Secret => "*".repeat(self.value.chars().count()),
            _ => self.value.clone(),
        }
    }

    fn cycle(&mut self, forward: bool) {
        let FieldKind::Choice(options) = self.kind else { return };
        if options.is_empty() {
            return;
        }
        let at = options.iter().position(|o| *o == self.value).unwrap_or(0);
        let next = if forward { (at + 1) % options.len() } else { (at + options.len() - 1) % options.len() };
        self.value = options[next].to_owned();
    }
}

/// Where the form stands with qx-node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Status {
    /// Waiting for the operator.
    #[default]
    Editing,
    /// A request is out; the text says which (`Applying...`). Keys other than Esc are ignored.
    Pending(String),
    /// The last request failed for a reason no field carries; the form stays editable.
    Failed(String),
}

/// What a key did to the form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormKey {
    /// Nothing (a key the form does not use, or any key but Esc while a request is out).
    Ignored,
    /// The value of the named field changed.
    Edited(&'static str),
    /// Focus left the named field.
    Left(&'static str),
    Submit,
    Cancel,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pub fields: Vec<Field>,
    /// Index into `fields`; always an enabled field when there is one.
    pub focus: usize,
    pub status: Status,
    /// Whether the operator changed anything (a late pre-fill must not overwrite their typing).
    pub touched: bool,
}

impl Form {
    pub fn new(fields: Vec<Field>) -> Self {
        let mut form = Self { fields, ..Self::default() };
        form.focus_first();
        form
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    pub fn field_mut(&mut self, name: &str) -> Option<&mut Field> {
        self.fields.iter_mut().find(|f| f.name == name)
    }

    /// The value of field `name`, empty when there is no such field.
    pub fn value(&self, name: &str) -> &str {
        self.field(name).map_or("", |f| f.value.as_str())
    }

    pub fn set_value(&mut self, name: &str, value: impl Into<String>) {
        if let Some(field) = self.field_mut(name) {
            field.value = value.into();
        }
    }

    pub fn set_error(&mut self, name: &str, error: Option<String>) {
        if let Some(field) = self.field_mut(name) {
            field.error = error;
        }
    }

    /// Enables or disables `name`; a disabled field loses its error, and focus moves off it.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) {
        if let Some(field) = self.field_mut(name) {
            field.enabled = enabled;
            if !enabled {
                field.error = None;
            }
        }
        if !self.fields.get(self.focus).is_some_and(|f| f.enabled) {
            self.focus_first();
        }
    }

    pub fn has_errors(&self) -> bool {
        self.fields.iter().any(|f| f.error.is_some())
    }

    pub fn focused(&self) -> Option<&Field> {
        self.fields.get(self.focus)
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.status, Status::Pending(_))
    }

    fn focus_first(&mut self) {
        self.focus = self.fields.iter().position(|f| f.enabled).unwrap_or(0);
    }

    fn move_focus(&mut self, forward: bool) -> FormKey {
        let count = self.fields.len();
        let left = self.focus;
        for step in 1..=count {
            let at = if forward { (left + step) % count } else { (left + count - step % count) % count };
            if self.fields[at].enabled {
                self.focus = at;
                break;
            }
        }
        if self.focus == left {
            return FormKey::Ignored;
        }
        FormKey::Left(self.fields[left].name)
    }

    /// Applies one key: Tab/↓ and Shift-Tab/↑ move, Enter submits, Esc cancels, the rest edits the focused field.
    pub fn on_key(&mut self, key: KeyEvent) -> FormKey {
        if key.code == KeyCode::Esc {
            return FormKey::Cancel;
        }
        if self.is_pending() || self.fields.is_empty() {
            return FormKey::Ignored;
        }
        match key.code {
            KeyCode::Enter => return FormKey::Submit,
            KeyCode::Tab | KeyCode::Down => return self.move_focus(true),
            KeyCode::BackTab | KeyCode::Up => return self.move_focus(false),
            _ => {}
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL) || key.modifiers.contains(KeyModifiers::ALT);
        let field = &mut self.fields[self.focus];
        if !field.enabled {
            return FormKey::Ignored;
        }
        let before = field.value.clone();
        match (field.kind, key.code) {
            (FieldKind::Choice(_), KeyCode::Right | KeyCode::Char(' ')) => field.cycle(true),
            (FieldKind::Choice(_), KeyCode::Left) => field.cycle(false),
            (FieldKind::Choice(_), _) => {}
            (_, KeyCode::Char('u')) if key.modifiers.contains(KeyModifiers::CONTROL) => field.value.clear(),
            (_, KeyCode::Char(c)) if !ctrl && !c.is_control() && field.value.len() < MAX_FIELD_LEN => {
                field.value.push(c);
            }
            (_, KeyCode::Backspace) => {
                field.value.pop();
            }
            _ => {}
        }
        if field.value == before {
            return FormKey::Ignored;
        }
        self.touched = true;
        if matches!(self.status, Status::Failed(_)) {
            self.status = Status::Editing;
        }
        FormKey::Edited(field.name)
    }

    /// A refused request: qx-node's validation problems go onto the fields they name, any other reason (and
    /// problems naming no field here) under the form, after `what` ("Joining failed").
    pub fn on_refused(&mut self, error: &crate::rpc::RpcError, what: &str) {
        self.status = Status::Editing;
        let rest = if error.code == tonic::Code::InvalidArgument {
            self.apply_server_errors(&error.message)
        } else {
            Some(error.message.clone())
        };
        if let Some(rest) = rest {
            self.status = Status::Failed(format!("{what}: {rest}"));
        }
    }

    /// Spreads qx-node's validation message (`field: "value" problem; field: problem`, the format of
    /// `qx_common::ValidationErrors`) over the fields it names. Problems naming no field of this form (or a disabled
    /// one) are returned, joined again, for the form's status line.
    pub fn apply_server_errors(&mut self, message: &str) -> Option<String> {
        let mut unplaced = Vec::new();
        for problem in qx_common::ValidationErrors::parse(message) {
            // `dns_servers[1]` or `network.address` still name a field of the form.
            let name = problem.field.split('[').next().unwrap_or(&problem.field);
            let name = name.rsplit('.').next().unwrap_or(name);
            let text = problem.without_field();
            match self.fields.iter_mut().find(|f| f.name == name && f.enabled && !name.is_empty()) {
                Some(field) => {
                    field.error = Some(match field.error.take() {
                        Some(earlier) => format!("{earlier}; {text}"),
                        None => text,
                    })
                }
                None if problem.field.is_empty() => unplaced.push(problem.problem),
                None => unplaced.push(problem.to_string()),
            }
        }
        if let Some(first) = self.fields.iter().position(|f| f.error.is_some()) {
            self.focus = first;
        }
        (!unplaced.is_empty()).then(|| unplaced.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialogs::key;

    fn form() -> Form {
        Form::new(vec![
            Field::text("a", "A", "x"),
            Field::choice("mode", "Mode", &["one", "two"], "two"),
            Field::text("b", "B", ""),
        ])
    }

    #[test]
    fn typing_edits_the_focused_field() {
        let mut form = form();
        assert_eq!(form.on_key(key(KeyCode::Char('y'))), FormKey::Edited("a"));
        assert_eq!(form.value("a"), "xy");
        assert_eq!(form.on_key(key(KeyCode::Backspace)), FormKey::Edited("a"));
        assert_eq!(form.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL)), FormKey::Edited("a"));
        assert_eq!(form.value("a"), "");
        assert_eq!(form.on_key(key(KeyCode::Backspace)), FormKey::Ignored);
        assert!(form.touched);
    }

    #[test]
    fn focus_moves_both_ways_and_skips_disabled_fields() {
        let mut form = form();
        assert_eq!(form.on_key(key(KeyCode::Tab)), FormKey::Left("a"));
        assert_eq!(form.focused().unwrap().name, "mode");
        assert_eq!(form.on_key(key(KeyCode::Right)), FormKey::Edited("mode"));
        assert_eq!(form.value("mode"), "one");
        assert_eq!(form.on_key(key(KeyCode::Left)), FormKey::Edited("mode"));
        assert_eq!(form.value("mode"), "two");
        assert_eq!(form.on_key(key(KeyCode::Char('z'))), FormKey::Ignored);
        form.set_enabled("b", false);
        assert_eq!(form.on_key(key(KeyCode::Down)), FormKey::Left("mode"));
        assert_eq!(form.focused().unwrap().name, "a", "b is skipped, focus wraps");
        assert_eq!(form.on_key(key(KeyCode::BackTab)), FormKey::Left("a"));
        assert_eq!(form.focused().unwrap().name, "mode");
        assert_eq!(form.on_key(key(KeyCode::Up)), FormKey::Left("mode"));
        assert_eq!(form.focused().unwrap().name, "a");
    }

    #[test]
    fn enter_submits_esc_cancels_and_pending_ignores_the_rest() {
        let mut form = form();
        assert_eq!(form.on_key(key(KeyCode::Enter)), FormKey::Submit);
        form.status = Status::Pending("Applying...".into());
        assert_eq!(form.on_key(key(KeyCode::Enter)), FormKey::Ignored);
        assert_eq!(form.on_key(key(KeyCode::Char('q'))), FormKey::Ignored);
        assert_eq!(form.on_key(key(KeyCode::Esc)), FormKey::Cancel);
    }

    #[test]
    fn server_errors_land_on_their_fields() {
        let mut form = form();
        let rest = form.apply_server_errors(
            "b: \"10.0.0.5\" has no prefix length (e.g. /24); node: is odd; b[0]: again; mode: \"three\" is unknown",
        );
        assert_eq!(rest.as_deref(), Some("node: is odd"));
        assert_eq!(
            form.field("b").unwrap().error.as_deref(),
            Some("\"10.0.0.5\" has no prefix length (e.g. /24); again")
        );
        assert_eq!(form.field("mode").unwrap().error.as_deref(), Some("\"three\" is unknown"));
        assert_eq!(form.focused().unwrap().name, "mode", "focus goes to the first field in error");
        assert_eq!(form.apply_server_errors("no field named at all"), Some("no field named at all".into()));
    }

    #[test]
    fn server_values_holding_separators_stay_whole() {
        // qx-node quotes values, so `; ` or `: ` inside one (a kernel command line, a path) splits nothing.
        let mut form = form();
        let problems = qx_common::ValidationErrors(vec![
            qx_common::FieldError::new("a", "x; b: \"y\"", "contains control characters"),
            qx_common::FieldError::new("b", "", "is required"),
        ]);
        assert_eq!(form.apply_server_errors(&problems.to_string()), None);
        assert_eq!(form.field("a").unwrap().error.as_deref(), Some(r#""x; b: \"y\"" contains control characters"#));
        assert_eq!(form.field("b").unwrap().error.as_deref(), Some("is required"));
    }
}
