//! What the agent tells the person watching: an indicatif bar on a
//! terminal, plain lines on stdout otherwise (logs, tests, serial consoles).
//! stderr is kept for the one-line error.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    last_pct: u64,
    total: u64,
}

impl Progress {
    pub fn new() -> Self {
        Self { bar: None, last_pct: u64::MAX, total: 0 }
    }

    /// Starts a byte counter for staging `total` bytes, from `done`.
    pub fn start(&mut self, what: &str, done: u64, total: u64) {
        self.total = total.max(1);
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            bar.set_position(done);
            self.bar = Some(bar);
        } else {
            if done == 0 {
                println!("{what} ({total} bytes)");
            } else {
                println!("{what}: {done} of {total} bytes already staged");
            }
        }
        self.last_pct = done * 100 / self.total;
    }

    pub fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let pct = done * 100 / self.total;
        if pct / 10 != self.last_pct / 10 {
            println!("staging: {pct}% ({done}/{} bytes)", self.total);
            self.last_pct = pct;
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// A state change or event, one line.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
