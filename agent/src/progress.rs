//! What the agent tells the person watching: a one-line bar on a terminal,
//! plain lines on stdout otherwise (logs, tests, serial consoles). stderr
//! is kept for the one-line error.
//!
//! The bar is drawn here rather than with indicatif, which cost the agent
//! about 35 KB of its 3 MB budget for one line of output.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    /// Says nothing (`install --json`: stdout is the one JSON document).
    quiet: bool,
    bar: Option<Bar>,
    last_pct: u64,
    total: u64,
}

struct Bar {
    started: Instant,
    /// Bytes done when the bar started (a resumed staging).
    from: u64,
    done: u64,
    /// The permille last drawn: the bar is redrawn at most 1000 times.
    drawn: Option<u64>,
}

const CLEAR: &str = "\r\x1b[2K";
const WIDTH: u64 = 24;

impl Progress {
    pub fn new() -> Self {
        Self { quiet: false, bar: None, last_pct: u64::MAX, total: 0 }
    }

    pub fn quiet() -> Self {
        Self { quiet: true, ..Self::new() }
    }

    /// Starts a byte counter for staging `total` bytes, from `done`.
    pub fn start(&mut self, what: &str, done: u64, total: u64) {
        self.total = total.max(1);
        if self.quiet {
            return;
        }
        if std::io::stderr().is_terminal() {
            // The label on a line of its own: the bar line stays short
            // enough (under 80 columns) never to wrap, which would leave a
            // copy of it behind at every redraw.
            println!("{what}");
            let bar = Bar { started: Instant::now(), from: done, done, drawn: None };
            self.bar = Some(bar);
            self.draw();
        } else if done == 0 {
            println!("{what} ({total} bytes)");
        } else {
            println!("{what}: {done} of {total} bytes already staged");
        }
        self.last_pct = done * 100 / self.total;
    }

    pub fn set(&mut self, done: u64) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &mut self.bar {
            bar.done = done;
            self.draw();
            return;
        }
        let pct = done * 100 / self.total;
        if pct / 10 != self.last_pct / 10 {
            println!("staging: {pct}% ({done}/{} bytes)", self.total);
            self.last_pct = pct;
        }
    }

    pub fn finish(&mut self) {
        if self.bar.take().is_some() {
            eprint!("{CLEAR}");
        }
    }

    /// A state change or event, one line.
    pub fn note(&self, line: &str) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            eprint!("{CLEAR}");
            println!("{line}");
            eprint!("{}", bar.line(self.total));
        } else {
            println!("{line}");
        }
    }

    fn draw(&mut self) {
        let total = self.total;
        let Some(bar) = &mut self.bar else { return };
        let permille = bar.done.min(total) * 1000 / total;
        if bar.drawn == Some(permille) {
            return;
        }
        bar.drawn = Some(permille);
        let _ = std::io::stderr().write_all(bar.line(total).as_bytes());
    }
}

impl Bar {
    /// `[=======>                ] 12.0/40.0 MiB 5.1 MiB/s eta 6s`: at most
    /// 24 + 2 + 2×11 + 13 + 13 columns.
    fn line(&self, total: u64) -> String {
        let filled = (self.done.min(total) * WIDTH / total) as usize;
        let mut gauge = "=".repeat(filled);
        if filled < WIDTH as usize {
            gauge.push('>');
        }
        // Whole numbers only: float formatting would cost the agent ~10 KB.
        let millis = self.started.elapsed().as_millis().max(1) as u64;
        let rate =
            if millis > 500 { self.done.saturating_sub(self.from).saturating_mul(1000) / millis } else { 0 };
        let eta = match rate {
            0 => String::new(),
            r => format!(" eta {}s", total.saturating_sub(self.done).div_ceil(r)),
        };
        format!(
            "{CLEAR}[{gauge:<width$}] {}/{} {}/s{eta}",
            mib(self.done),
            mib(total),
            mib(rate),
            width = WIDTH as usize
        )
    }
}

use perch_support::mib;

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_and_never_overflows() {
        let bar = |done| Bar { started: Instant::now(), from: 0, done, drawn: None };
        let half = bar(512 << 20).line(1 << 30);
        assert!(half.contains(&format!("[{}>{}]", "=".repeat(12), " ".repeat(11))), "{half}");
        assert!(half.contains("512.0 MiB/1024.0 MiB"), "{half}");
        let over = bar(2 << 30).line(1 << 30);
        assert!(over.contains(&format!("[{}]", "=".repeat(24))), "{over}");
        // The widest line still fits 80 columns.
        let mut wide = bar(999_999 << 20);
        wide.from = 0;
        let line = wide.line(999_999 << 20);
        assert!(line.len() - CLEAR.len() < 80, "{} columns: {line}", line.len() - CLEAR.len());
    }
}
