//! Log lines that a peer can cause one per connection, flow or packet (a refusal, a malformed
//! request, a new UDP flow) go through a [`LogBudget`]: a few lines per period, then silence with a
//! count of what was left out, so a flood from spoofed or many sources cannot fill a disk. The
//! metrics still count every event.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lines allowed at one call site: `lines` per `period`.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    period: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    written: u32,
    left_out: u64,
}

impl LogBudget {
    pub const fn new(lines: u32, period: Duration) -> Self {
        Self { lines, period, state: Mutex::new(Window { start: None, written: 0, left_out: 0 }) }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines left out since the
    /// last one written (to log with it), `None` to leave this one out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = crate::sync::lock(&self.state);
        if w.start.is_none_or(|start| now.saturating_duration_since(start) >= self.period) {
            w.start = Some(now);
            w.written = 0;
        }
        if w.written >= self.lines {
            w.left_out += 1;
            return None;
        }
        w.written += 1;
        Some(std::mem::take(&mut w.left_out))
    }
}

/// `text` as a log field another party chose: control characters (line breaks, escapes) left out,
/// at most `max` characters, with `…` where it was cut.
pub fn printable(text: &str, max: usize) -> String {
    let mut shown: String = text.trim().chars().filter(|c| !c.is_control()).take(max + 1).collect();
    if shown.chars().count() > max {
        shown = shown.chars().take(max).collect();
        shown.push('…');
    }
    shown
}

/// Writes a log line at `$level` (`info`, `warn`, ...) within a budget of its own call site (10
/// lines every 10 s), with `left_out` counting the lines held back since the last one written:
/// `limited!(info, reason, "not a TLS ClientHello: closing")`.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($rest:tt)+) => {{
        static BUDGET: $crate::logs::LogBudget =
            $crate::logs::LogBudget::new(10, ::std::time::Duration::from_secs(10));
        if let Some(left_out) = BUDGET.allow() {
            $crate::tracing::$level!(left_out, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_another_party_is_shown_on_one_line_and_bounded() {
        assert_eq!(printable("  refused\n\u{1b}[31mfake line\r\n", 100), "refused[31mfake line");
        assert_eq!(printable(&"x".repeat(300), 5), "xxxxx…");
        assert_eq!(printable("short", 5), "short");
    }

    #[test]
    fn a_few_lines_per_period_then_a_count_of_the_rest() {
        let budget = LogBudget::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first: Vec<_> = (0..1000).map(|i| budget.allow_at(at(i))).collect();
        assert_eq!(first[..3], [Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none));
        // The next period: the first line says how many were left out.
        assert_eq!(budget.allow_at(at(10_000)), Some(997));
        assert_eq!(budget.allow_at(at(10_001)), Some(0));
    }
}
