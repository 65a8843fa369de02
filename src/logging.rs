//! Log output fit for where it goes: coloured text on a terminal, syslog-prioritised lines under
//! journald, plain text into a file or pipe, or JSON.
//!
//! Owns: the tracing subscriber, the choice of text style ([`TextStyle::choose`]), the filter
//! handle used to change the level on reload, and keeping every record on one line (a message
//! with a hint after a blank line is joined with `; `, so no line of a log file or the journal
//! lacks its time and level).
//! Must never: print secrets (callers never log them; nothing here adds any), or write ANSI
//! escapes anywhere but a terminal.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::{EnvFilter, Registry, prelude::*};

use crate::settings::LogFormat;

/// Changes the log filter of the running process (SIGHUP reload).
#[derive(Clone)]
pub struct LogHandle {
    reload: Option<reload::Handle<EnvFilter, Registry>>,
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogHandle").finish_non_exhaustive()
    }
}

impl LogHandle {
    /// A handle that changes nothing (when logging was set up elsewhere, as in tests).
    pub fn detached() -> LogHandle {
        LogHandle { reload: None }
    }

    /// Sets a new filter unless `RUST_LOG` is set (the environment wins).
    ///
    /// # Errors
    ///
    /// An invalid filter string.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(());
        }
        let filter =
            EnvFilter::try_new(level).map_err(|error| format!("log level '{level}': {error}"))?;
        if let Some(handle) = &self.reload {
            handle.reload(filter).map_err(|error| error.to_string())?;
        }
        Ok(())
    }
}

/// Whether stderr is connected to the journal: `JOURNAL_STREAM` is set and names our stderr.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    // /proc/self/fd/2 is our stderr; journald passes "device:inode" of the stream it gave us.
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(meta) => meta.dev().to_string() == device && meta.ino().to_string() == inode,
        // Cannot check (no /proc): trust the variable.
        Err(_) => true,
    }
}

/// How text log lines look, chosen from where stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextStyle {
    /// A terminal: timestamps and ANSI colours.
    Colour,
    /// journald: a `<N>` syslog priority prefix, no timestamp (the journal adds one), no colour.
    Journal,
    /// A file or a pipe: timestamps, no ANSI escapes.
    Plain,
}

/// The facts about stderr and the environment that decide the [`TextStyle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputFacts {
    /// stderr is the journal's stream (`JOURNAL_STREAM` names it).
    pub journal: bool,
    /// stderr is a terminal.
    pub terminal: bool,
    /// `NO_COLOR` is set to a non-empty value (no-color.org).
    pub no_color: bool,
}

impl OutputFacts {
    /// The facts of this process, read now.
    pub fn of_this_process() -> OutputFacts {
        use std::io::IsTerminal;
        OutputFacts {
            journal: stderr_is_journal(),
            terminal: std::io::stderr().is_terminal(),
            no_color: std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty()),
        }
    }
}

impl TextStyle {
    /// The journal wins (its stream is never a terminal, but a terminal program may have been
    /// started with the variable inherited); colours only on a terminal without `NO_COLOR`.
    pub fn choose(facts: OutputFacts) -> TextStyle {
        if facts.journal {
            TextStyle::Journal
        } else if facts.terminal && !facts.no_color {
            TextStyle::Colour
        } else {
            TextStyle::Plain
        }
    }
}

/// Installs the global subscriber, writing to stderr.
///
/// `level` is used unless `RUST_LOG` is set. Under journald (text format) lines carry the
/// `<N>` syslog priority prefix and no timestamp, so `journalctl -p warning` works.
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|value| EnvFilter::try_new(value).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let style = TextStyle::choose(OutputFacts::of_this_process());
    let result = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text if style == TextStyle::Journal => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JournalFormat(
                        Format::default().without_time().with_ansi(false),
                    ))
                    .with_ansi(false)
                    .with_writer(one_line_stderr),
            )
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(style == TextStyle::Colour)
                    .with_writer(one_line_stderr),
            )
            .try_init(),
    };
    match result {
        Ok(()) => LogHandle {
            reload: Some(handle),
        },
        // Already initialised (tests, or a library user): leave theirs in place.
        Err(_) => LogHandle::detached(),
    }
}

/// stderr, one record per line (see [`OneLine`]).
fn one_line_stderr() -> OneLine<std::io::Stderr> {
    OneLine(std::io::stderr())
}

/// A writer that keeps each record it is given on one line: the text formatter hands it a whole
/// record per write (tracing-subscriber formats a record into a buffer, then writes it at once);
/// a blank line inside (a message and its hint) becomes `; `, any other newline inside `; ` too,
/// and the record ends with exactly one newline. JSON needs none of this: it escapes newlines.
pub struct OneLine<W>(pub W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&one_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `record` with its inner newlines joined as `; ` and one final newline.
pub fn one_line(record: &[u8]) -> Vec<u8> {
    let body = record.strip_suffix(b"\n").unwrap_or(record);
    let mut joined = Vec::with_capacity(body.len() + 1);
    let mut lines = body
        .split(|byte| *byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .peekable();
    while let Some(line) = lines.next() {
        joined.extend_from_slice(line);
        if lines.peek().is_some() {
            joined.extend_from_slice(b"; ");
        }
    }
    joined.push(b'\n');
    joined
}

/// The syslog priority journald reads from a `<N>` line prefix (sd-daemon(3)).
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Text lines with a `<N>` priority prefix and no timestamp, for journald.
struct JournalFormat(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_with_a_hint_is_one_line() {
        let joined = |text: &str| String::from_utf8(one_line(text.as_bytes())).expect("utf-8");
        assert_eq!(
            joined("<3> ERROR paywatch: unknown key 'lokback'\n\ndid you mean 'lookback'?\n"),
            "<3> ERROR paywatch: unknown key 'lokback'; did you mean 'lookback'?\n"
        );
        assert_eq!(joined("a\nb\r\nc"), "a; b; c\n");
        assert_eq!(joined("plain\n"), "plain\n");
    }

    #[test]
    fn every_text_log_line_carries_its_level() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        for journal in [false, true] {
            let captured = Captured::default();
            let writer = captured.clone();
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || OneLine(writer.clone()));
            let subscriber: Box<dyn Subscriber + Send + Sync> =
                if journal {
                    Box::new(tracing_subscriber::registry().with(layer.event_format(
                        JournalFormat(Format::default().without_time().with_ansi(false)),
                    )))
                } else {
                    Box::new(tracing_subscriber::registry().with(layer))
                };
            tracing::subscriber::with_default(subscriber, || {
                tracing::error!("the config has an unknown key\n\ndid you mean 'lookback'?");
                tracing::warn!(key = "x", "two\nlines");
            });
            let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "journal {journal}: {text}");
            for line in lines {
                assert!(
                    line.contains("ERROR") || line.contains("WARN"),
                    "an orphan line without its level (journal {journal}): {line}"
                );
            }
        }
    }

    #[test]
    fn priorities_match_syslog() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
    }

    fn style(journal: bool, terminal: bool, no_color: bool) -> TextStyle {
        TextStyle::choose(OutputFacts {
            journal,
            terminal,
            no_color,
        })
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert_eq!(style(false, true, false), TextStyle::Colour);
        assert_eq!(style(false, true, true), TextStyle::Plain);
        assert_eq!(style(false, false, false), TextStyle::Plain);
        assert_eq!(style(false, false, true), TextStyle::Plain);
    }

    #[test]
    fn the_journal_always_gets_priority_prefixed_lines() {
        assert_eq!(style(true, false, false), TextStyle::Journal);
        assert_eq!(style(true, true, false), TextStyle::Journal);
        assert_eq!(style(true, false, true), TextStyle::Journal);
    }
}
