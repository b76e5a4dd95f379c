//! F7: a scrollable view of `GetDiagnostics`: accelerator, QEMU, hardware and the daemon's recent log.

use ratatui::crossterm::event::{KeyCode, KeyEvent};

use super::Outcome;
use crate::host::DiagnosticsReport;
use crate::rpc::{Request, RpcError};

/// Columns ←/→ move the view sideways (long log lines are cut, not wrapped, so they stay one per row).
const PAN_STEP: usize = 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiagnosticsView {
    /// `None` while loading; the error text when it failed.
    pub report: Option<Result<DiagnosticsReport, String>>,
    /// The rows to scroll through, derived from `report`.
    pub lines: Vec<String>,
    /// First row shown.
    pub scroll: usize,
    /// First column shown.
    pub pan: usize,
}

impl DiagnosticsView {
    pub fn open() -> (Self, Request) {
        let mut view = Self::default();
        view.set_lines();
        (view, Request::GetDiagnostics)
    }

    fn set_lines(&mut self) {
        self.lines = match &self.report {
            None => vec!["Loading...".to_owned()],
            Some(Ok(report)) => report.lines(),
            Some(Err(error)) => {
                vec![format!("GetDiagnostics failed: {error}"), String::new(), "F5 tries again.".into()]
            }
        };
    }

    pub fn on_loaded(&mut self, result: Result<DiagnosticsReport, RpcError>) {
        self.report = Some(result.map_err(|e| e.message));
        self.set_lines();
        self.scroll = self.scroll.min(self.lines.len().saturating_sub(1));
    }

    /// `page`: how many rows the view shows, so PgUp/PgDn move by a screenful and End shows the last one.
    pub fn on_key(&mut self, key: KeyEvent, page: usize) -> Outcome {
        let page = page.max(1);
        let last = self.lines.len().saturating_sub(page);
        let longest = self.lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        match key.code {
            KeyCode::Esc | KeyCode::Char('q') | KeyCode::F(7) => return Outcome::Close,
            KeyCode::F(5) => {
                self.report = None;
                self.set_lines();
                return Outcome::Call(Request::GetDiagnostics);
            }
            KeyCode::Up => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::Down => self.scroll += 1,
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(page),
            KeyCode::PageDown | KeyCode::Char(' ') => self.scroll += page,
            KeyCode::Home => self.scroll = 0,
            KeyCode::End => self.scroll = last,
            KeyCode::Left => self.pan = self.pan.saturating_sub(PAN_STEP),
            KeyCode::Right => self.pan = (self.pan + PAN_STEP).min(longest.saturating_sub(PAN_STEP)),
            _ => {}
        }
        self.scroll = self.scroll.min(last);
        Outcome::Stay
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::dialogs::key;

    fn loaded(log_lines: usize) -> DiagnosticsView {
        let (mut view, request) = DiagnosticsView::open();
        assert_eq!(request, Request::GetDiagnostics);
        assert_eq!(view.lines, ["Loading..."]);
        let report = DiagnosticsReport {
            log_lines: (0..log_lines).map(|i| format!("log line {i}")).collect(),
            hardware: vec!["CPU: 2 x test".into()],
            accelerator: "tcg".into(),
            ..DiagnosticsReport::default()
        };
        view.on_loaded(Ok(report));
        view
    }

    #[test]
    fn scrolling_stays_inside_the_report() {
        let mut view = loaded(50);
        let total = view.lines.len();
        assert_eq!(total, 7 + 50);
        view.on_key(key(KeyCode::Up), 10);
        assert_eq!(view.scroll, 0);
        view.on_key(key(KeyCode::Down), 10);
        view.on_key(key(KeyCode::PageDown), 10);
        assert_eq!(view.scroll, 11);
        view.on_key(key(KeyCode::End), 10);
        assert_eq!(view.scroll, total - 10);
        view.on_key(key(KeyCode::Down), 10);
        assert_eq!(view.scroll, total - 10, "not past the end");
        view.on_key(key(KeyCode::Up), 10);
        assert_eq!(view.scroll, total - 11, "Up after End moves at once");
        view.on_key(key(KeyCode::Home), 10);
        assert_eq!(view.scroll, 0);
        view.on_key(key(KeyCode::End), 0);
        assert_eq!(view.scroll, total - 1, "a zero-row view still scrolls sanely");
    }

    #[test]
    fn reload_close_and_failure() {
        let mut view = loaded(3);
        assert_eq!(view.on_key(key(KeyCode::F(5)), 10), Outcome::Call(Request::GetDiagnostics));
        assert_eq!(view.lines, ["Loading..."]);
        view.on_loaded(Err(RpcError::new(tonic::Code::Unavailable, "cannot connect")));
        assert_eq!(view.lines[0], "GetDiagnostics failed: cannot connect");
        assert_eq!(view.on_key(key(KeyCode::Esc), 10), Outcome::Close);
    }
}
