//! Dialogs, drawn in a framed box centred over the main screen; F7's diagnostics take the whole screen.
//!
//! A form shows one row per field (`>` marks the focused one, `_` its cursor), the problem with a field on the
//! rows under it, then what the dialog waits for or why the last request failed, then the keys it takes.

use ratatui::widgets::{Block, Clear};

use super::*;
use crate::dialogs::form::{Field, FieldKind, Form, Status};
use crate::dialogs::power::{running_text, Stage};
use crate::dialogs::{ConfirmDialog, DiagnosticsView, Dialog, JoinDialog, NetworkDialog, PowerDialog, SshDialog};
use crate::host::PowerAction;

const DIALOG: Style = Style::new().fg(Color::Gray).bg(Color::Black);
const BORDER: Style = Style::new().fg(Color::Yellow).bg(Color::Black);
const DIM: Style = Style::new().fg(Color::DarkGray);
/// Wider boxes make lines too long to read at a glance on large screens.
const MAX_WIDTH: u16 = 76;
/// Width of a form's label column.
const FORM_LABEL_WIDTH: usize = 15;
/// Columns before a field's value: the focus marker and a blank, the label, a blank.
const VALUE_COLUMN: usize = 2 + FORM_LABEL_WIDTH + 1;

/// Rows of log and report the diagnostics view shows in `area`: all but its frame and the key row.
pub fn diagnostics_page(area: Rect) -> u16 {
    area.height.saturating_sub(3)
}

pub(super) fn draw(dialog: &Dialog, app: &App, area: Rect, buf: &mut Buffer) {
    let width = area.width.min(MAX_WIDTH);
    // Frame and one blank column on each side.
    let text_width = usize::from(width.saturating_sub(4));
    let (title, lines) = match dialog {
        Dialog::Diagnostics(view) => return draw_diagnostics(view, area, buf),
        Dialog::Network(dialog) => network(dialog, text_width),
        Dialog::Ssh(dialog) => ssh(dialog, app.now, text_width),
        Dialog::Join(dialog) => join(dialog, text_width),
        Dialog::Confirm(dialog) => confirm(dialog, text_width),
        Dialog::Power(dialog) => power(dialog, text_width),
    };
    let height = u16::try_from(lines.len() + 2).unwrap_or(u16::MAX).min(area.height);
    let rect = Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    framed(&title, lines, rect, buf);
}

/// Clears `rect` and draws `lines` in a frame titled `title`; a rect too small for a frame gets the bare lines.
fn framed(title: &str, lines: Vec<Line<'static>>, rect: Rect, buf: &mut Buffer) {
    Clear.render(rect, buf);
    buf.set_style(rect, DIALOG);
    if rect.width < 5 || rect.height < 3 {
        Paragraph::new(lines).style(DIALOG).render(rect, buf);
        return;
    }
    let block = Block::bordered().border_style(BORDER).style(DIALOG).title(Span::styled(format!(" {title} "), VALUE));
    let inner = block.inner(rect);
    block.render(rect, buf);
    let inner = Rect { x: inner.x + 1, width: inner.width - 2, ..inner };
    Paragraph::new(lines).style(DIALOG).render(inner, buf);
}

fn network(dialog: &NetworkDialog, width: usize) -> (String, Vec<Line<'static>>) {
    let hints = edit_hints(&dialog.form, "apply");
    ("Configure management network".into(), form_lines(&[], &dialog.form, hints, width))
}

fn ssh(dialog: &SshDialog, now: i64, width: usize) -> (String, Vec<Line<'static>>) {
    let intro = [format!("SSH is {}.", dialog.current.describe(now))];
    ("SSH".into(), form_lines(&intro, &dialog.form, edit_hints(&dialog.form, "apply"), width))
}

fn join(dialog: &JoinDialog, width: usize) -> (String, Vec<Line<'static>>) {
    let intro = ["Register this node with a Quantix control plane, using a join token issued by it.".to_owned()];
    ("Join cluster".into(), form_lines(&intro, &dialog.form, edit_hints(&dialog.form, "join"), width))
}

fn confirm(dialog: &ConfirmDialog, width: usize) -> (String, Vec<Line<'static>>) {
    let hints = match dialog.status {
        Status::Pending(_) => pending_hints(),
        _ => vec![("Enter", dialog.confirm_label()), ("Esc", "cancel")],
    };
    let form = Form { status: dialog.status.clone(), ..Form::default() };
    (dialog.title().into(), form_lines(&dialog.text(), &form, hints, width))
}

fn power(dialog: &PowerDialog, width: usize) -> (String, Vec<Line<'static>>) {
    let pending = dialog.form.is_pending();
    let (intro, form, hints) = match &dialog.stage {
        Stage::Choose => {
            let running = match dialog.running_vms {
                0 => "No VMs are running.".to_owned(),
                n => format!("{}; you will be asked to confirm.", running_text(n)),
            };
            let hints = if pending {
                pending_hints()
            } else {
                vec![("Left/Right", "choose"), ("Enter", "continue"), ("Esc", "cancel")]
            };
            (vec!["Reboot or shut down this host?".to_owned(), running], dialog.form.clone(), hints)
        }
        Stage::Warn { action, warning } => {
            let verb = match action {
                PowerAction::Reboot => "reboot",
                PowerAction::Shutdown => "shut down",
            };
            let intro = vec![warning.clone(), format!("Press Enter to {verb} anyway, Esc to cancel.")];
            let hints = if pending { pending_hints() } else { vec![("Enter", verb), ("Esc", "cancel")] };
            // The choice is made: only the warning and the status are left.
            (intro, Form { status: dialog.form.status.clone(), ..Form::default() }, hints)
        }
    };
    ("Power".into(), form_lines(&intro, &form, hints, width))
}

fn pending_hints() -> Vec<(&'static str, &'static str)> {
    vec![("Esc", "close (the request goes on)")]
}

fn edit_hints(form: &Form, submit: &'static str) -> Vec<(&'static str, &'static str)> {
    if form.is_pending() {
        return pending_hints();
    }
    let mut hints = vec![("Tab", "next"), ("Shift-Tab", "previous")];
    if form.fields.iter().any(|f| f.enabled && matches!(f.kind, FieldKind::Choice(_))) {
        hints.push(("Left/Right", "choose"));
    }
    hints.extend([("Ctrl-U", "clear"), ("Enter", submit), ("Esc", "cancel")]);
    hints
}

/// A blank row, the intro paragraphs, the fields with their problems, the status, and the key hints.
fn form_lines(
    intro: &[String],
    form: &Form,
    hints: Vec<(&'static str, &'static str)>,
    width: usize,
) -> Vec<Line<'static>> {
    let mut lines = vec![Line::default()];
    for paragraph in intro {
        lines.extend(wrap(paragraph, width).into_iter().map(Line::from));
    }
    if !intro.is_empty() && !form.fields.is_empty() {
        lines.push(Line::default());
    }
    for (index, field) in form.fields.iter().enumerate() {
        lines.push(field_line(field, index == form.focus && field.enabled));
        if let Some(error) = &field.error {
            let indent = " ".repeat(VALUE_COLUMN);
            for row in wrap(error, width.saturating_sub(VALUE_COLUMN + 2)) {
                lines.push(Line::from(vec![Span::raw(indent.clone()), Span::styled(format!("! {row}"), ERROR)]));
            }
        }
    }
    let status = match &form.status {
        Status::Editing => None,
        Status::Pending(text) => Some((text, KEY)),
        Status::Failed(text) => Some((text, ERROR)),
    };
    lines.push(Line::default());
    if let Some((text, style)) = status {
        lines.extend(wrap(text, width).into_iter().map(|row| Line::styled(row, style)));
    }
    let hints = hints.into_iter().map(|(key, label)| (key.to_owned(), label.to_owned()));
    lines.extend(pack_keys(hints, width, 0));
    lines
}

fn field_line(field: &Field, focused: bool) -> Line<'static> {
    let (label_style, value_style) = if field.enabled { (Style::new(), VALUE) } else { (DIM, DIM) };
    let marker = if focused { Span::styled("> ", KEY) } else { Span::raw("  ") };
    let mut spans = vec![marker, Span::styled(format!("{:<FORM_LABEL_WIDTH$} ", field.label), label_style)];
    match field.kind {
        FieldKind::Choice(options) => {
            for (i, option) in options.iter().enumerate() {
                let selected = *option == field.value;
                if i > 0 {
                    spans.push(Span::raw("  "));
                }
                let mark = if selected { "(*) " } else { "( ) " };
                spans.push(Span::styled(format!("{mark}{option}"), if selected { value_style } else { label_style }));
            }
        }
        FieldKind::Text | FieldKind::Secret => {
            spans.push(Span::styled(field.shown(), value_style));
            if focused {
                spans.push(Span::styled("_", KEY));
            }
        }
    }
    if field.enabled && !field.hint.is_empty() {
        spans.push(Span::styled(format!("  ({})", field.hint), DIM));
    }
    Line::from(spans)
}

fn draw_diagnostics(view: &DiagnosticsView, area: Rect, buf: &mut Buffer) {
    let rows = usize::from(diagnostics_page(area));
    let total = view.lines.len();
    let scroll = view.scroll.min(total.saturating_sub(rows));
    let shown = view.lines.iter().skip(scroll).take(rows);
    let mut lines: Vec<Line<'static>> =
        shown.map(|line| Line::from(line.chars().skip(view.pan).collect::<String>())).collect();
    lines.resize(rows, Line::default());
    let width = usize::from(area.width.saturating_sub(4));
    let hints = [
        ("Up/Down", "scroll"),
        ("PgUp/PgDn", "page"),
        ("Home/End", "ends"),
        ("Left/Right", "pan"),
        ("F5", "reload"),
        ("Esc", "close"),
    ];
    let mut hint_rows = pack_keys(hints.map(|(k, l)| (k.to_owned(), l.to_owned())), width, 0);
    // One row for the keys: the rest goes to the report.
    hint_rows.truncate(1);
    lines.extend(hint_rows);
    let last = (scroll + rows).min(total);
    let title = if total > rows {
        format!("Diagnostics: lines {}-{last} of {total}", scroll + 1)
    } else {
        "Diagnostics".into()
    };
    framed(&title, lines, area, buf);
}

/// `text` broken at blanks into rows of at most `width` characters; words longer than a row are cut across rows.
fn wrap(text: &str, width: usize) -> Vec<String> {
    if width == 0 {
        return vec![text.to_owned()];
    }
    let mut rows = Vec::new();
    let mut row = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let row_len = row.chars().count();
            let needed = if row_len == 0 { word.len() } else { row_len + 1 + word.len() };
            if needed <= width {
                if row_len > 0 {
                    row.push(' ');
                }
                row.extend(&word);
                break;
            }
            if row_len > 0 {
                rows.push(std::mem::take(&mut row));
                continue;
            }
            rows.push(word[..width].iter().collect());
            word.drain(..width);
        }
    }
    rows.push(row);
    rows
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrapping() {
        assert_eq!(wrap("", 10), [""]);
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("ab abcdefgh", 4), ["ab", "abcd", "efgh"]);
        assert_eq!(wrap("x", 0), ["x"]);
    }
}
