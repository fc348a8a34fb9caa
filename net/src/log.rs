//! Log lines on stderr, one per event:
//! `2026-11-24T07:35:23.123456Z  INFO perch_agent::link: connected url=tls://…`.
//!
//! A small `tracing` subscriber rather than tracing-subscriber's fmt layer:
//! perch opens no spans, and the layer with its registry cost the agent
//! about 30 KB of its 3 MB budget (docs: operations/benchmarks).

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Sets up logging to stderr at `PERCH_LOG` (error, warn, info, debug,
/// trace), else `default`. A second call changes nothing.
///
/// async-nats logs whole message payloads at trace level, and payloads
/// carry enrollment tokens; it is held at debug so that no level of
/// logging ever shows a secret.
/// Logs to stderr only when `PERCH_LOG` asks: for the operator's
/// commands, whose stderr is otherwise the one line of an error.
pub fn init_logging_if_asked() {
    if std::env::var_os("PERCH_LOG").is_some() {
        init_logging(Level::ERROR);
    }
}

pub fn init_logging(default: Level) {
    let level = std::env::var("PERCH_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(default);
    let _ = tracing::subscriber::set_global_default(StderrLog { level });
}

struct StderrLog {
    level: Level,
}

impl StderrLog {
    fn limit(&self, target: &str) -> Level {
        if target == "async_nats" || target.starts_with("async_nats::") {
            // More verbose levels compare greater: keep the quieter one.
            self.level.min(Level::DEBUG)
        } else {
            self.level
        }
    }
}

impl Subscriber for StderrLog {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= self.limit(m.target())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.level))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let m = event.metadata();
        let mut line = format!(
            "{} {:>5} {}:",
            humantime::format_rfc3339_micros(SystemTime::now()),
            m.level().as_str(),
            m.target()
        );
        event.record(&mut Fields(&mut line));
        line.push('\n');
        // One write per line, so that lines from threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Writes the message, then `name=value` for every other field (strings
/// quoted). Control characters are escaped: a log line stays one line, and
/// text from the network cannot send escape sequences to a terminal.
struct Fields<'a>(&'a mut String);

impl Fields<'_> {
    fn push_escaped(&mut self, text: &str) {
        for c in text.chars() {
            if c.is_control() {
                self.0.extend(c.escape_default());
            } else {
                self.0.push(c);
            }
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.record_debug(field, &format_args!("{value}")),
            name => {
                let _ = write!(self.0, " {name}={value:?}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = match field.name() {
            "message" => format!(" {value:?}"),
            name => format!(" {name}={value:?}"),
        };
        self.push_escaped(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_nats_never_logs_below_debug() {
        let log = StderrLog { level: Level::TRACE };
        assert_eq!(log.limit("async_nats::connector"), Level::DEBUG);
        assert_eq!(log.limit("perch_agent::link"), Level::TRACE);
        let quiet = StderrLog { level: Level::WARN };
        assert_eq!(quiet.limit("async_nats"), Level::WARN);
    }

    #[test]
    fn events_are_one_line_with_their_fields() {
        tracing::dispatcher::with_default(&tracing::Dispatch::new(Capture), || {
            tracing::warn!(url = "tls://x:1", tries = 3, "link lost");
            tracing::warn!("from the wire: {}", "a\nb\x1b[2J");
        });
        CAPTURED.with(|c| {
            assert_eq!(*c.borrow(), " link lost url=\"tls://x:1\" tries=3 from the wire: a\\nb\\u{1b}[2J")
        });
    }

    thread_local! {
        static CAPTURED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }

    struct Capture;

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            CAPTURED.with(|c| event.record(&mut Fields(&mut c.borrow_mut())));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}
