//! What the `waxos` client and the `waxosd` host share: the gRPC contract, generated from
//! `proto/waxos.proto` (one crate so the two can never disagree), the log format, and the
//! backup file's format (`backup`: the client writes it, the host restores from it).
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("waxos.v1");

/// The encoded `FileDescriptorSet` of `waxos.proto`: what the host's gRPC reflection serves, so
/// grpcurl and other reflection clients need no copy of the .proto.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/waxos_descriptor.bin"));

pub mod backup;
pub mod pki;
pub mod signature;
pub mod tls;

/// Logging shared by both binaries: every line timestamped to the millisecond, local time.
///
/// The client writes each line to stderr as it is logged. The host logs every request and
/// response, thousands of lines a second, so it formats each line on the thread that logs it
/// and hands it to one writer thread, which writes what has accumulated with one `write`: one
/// syscall per batch instead of per line, and never a wait for the terminal on a request's
/// path. `flush` (called before the host exits) writes what is still queued, in order.
pub mod logging {
    use std::io::Write;
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::Duration;

    use chrono::{Datelike, Timelike};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::EnvFilter;

    /// `2026-11-25 09:12:03.481`.
    struct MillisecondTime;

    impl FormatTime for MillisecondTime {
        fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
            let now = chrono::Local::now();
            write!(
                w,
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
                now.year(),
                now.month(),
                now.day(),
                now.hour(),
                now.minute(),
                now.second(),
                now.timestamp_subsec_millis().min(999)
            )
        }
    }

    /// Beyond this many queued bytes (stderr is not keeping up) a line is written at once by the
    /// thread that logs it: memory stays bounded and no line is dropped.
    const QUEUED_BYTES_MAX: usize = 8 << 20;

    /// Lines waiting for the writer thread.
    struct Queue {
        lines: Mutex<Vec<u8>>,
        ready: Condvar,
        /// Held while writing, so batches reach stderr in the order they were queued.
        writing: Mutex<()>,
    }

    static QUEUE: OnceLock<Queue> = OnceLock::new();

    impl Queue {
        fn write_out(&self) {
            let Ok(_writing) = self.writing.lock() else { return };
            let batch = match self.lines.lock() {
                Ok(mut lines) => std::mem::take(&mut *lines),
                Err(_) => return,
            };
            if !batch.is_empty() {
                let _ = std::io::stderr().lock().write_all(&batch);
            }
        }
    }

    /// One formatted event as it may be written: a single line. Text from the network (a key,
    /// an address, a peer's error) reaches log messages; a newline or carriage return in it
    /// would forge a line of its own, so every control character but the final newline (and
    /// tabs, and the colour escapes of a terminal when `ansi`) is written escaped (`\n`,
    /// `\x1b`).
    pub fn one_line(event: &[u8], ansi: bool) -> std::borrow::Cow<'_, [u8]> {
        let body = event.strip_suffix(b"\n").unwrap_or(event);
        let keep = |b: u8| b >= 0x20 && b != 0x7f || b == b'\t' || (ansi && b == 0x1b);
        if body.iter().all(|&b| keep(b)) {
            return std::borrow::Cow::Borrowed(event);
        }
        let mut out = Vec::with_capacity(event.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if keep(b) => out.push(b),
                b => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        if body.len() < event.len() {
            out.push(b'\n');
        }
        std::borrow::Cow::Owned(out)
    }

    /// Asked once: every log line needs it, and it is a system call.
    fn stderr_is_terminal() -> bool {
        static IS_TERMINAL: OnceLock<bool> = OnceLock::new();
        *IS_TERMINAL.get_or_init(|| std::io::IsTerminal::is_terminal(&std::io::stderr()))
    }

    /// Unbatched logging's writer: each event straight to stderr, as one line.
    struct Direct;

    impl Write for Direct {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            std::io::stderr().write_all(&one_line(bytes, stderr_is_terminal()))?;
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            std::io::stderr().flush()
        }
    }

    /// What the formatter writes one line into.
    struct Queued;

    impl Write for Queued {
        fn write(&mut self, event: &[u8]) -> std::io::Result<usize> {
            let line = one_line(event, stderr_is_terminal());
            let bytes = &line[..];
            let Some(queue) = QUEUE.get() else {
                return std::io::stderr().write_all(bytes).map(|()| event.len());
            };
            let Ok(mut lines) = queue.lines.lock() else {
                return std::io::stderr().write_all(bytes).map(|()| event.len());
            };
            if lines.len() > QUEUED_BYTES_MAX {
                drop(lines);
                queue.write_out();
                return std::io::stderr().write_all(bytes).map(|()| event.len());
            }
            let was_empty = lines.is_empty();
            lines.extend_from_slice(bytes);
            drop(lines);
            if was_empty {
                queue.ready.notify_one();
            }
            Ok(event.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct MakeQueued;

    impl<'a> MakeWriter<'a> for MakeQueued {
        type Writer = Queued;
        fn make_writer(&'a self) -> Queued {
            Queued
        }
    }

    fn filter(default_level: &str) -> EnvFilter {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level))
    }

    /// Logs to stderr, line by line, at `default_level` unless `RUST_LOG` says otherwise.
    pub fn init(default_level: &str) {
        let _ = tracing_subscriber::fmt()
            .with_timer(MillisecondTime)
            .with_env_filter(filter(default_level))
            .with_target(false)
            .with_ansi(stderr_is_terminal())
            .with_writer(|| Direct)
            .try_init();
    }

    /// Like `init`, but lines are written in batches by a writer thread (see the module doc).
    /// Call `flush` before exiting; a panic flushes by itself.
    pub fn init_batched(default_level: &str) {
        let queue = QUEUE.get_or_init(|| Queue {
            lines: Mutex::new(Vec::new()),
            ready: Condvar::new(),
            writing: Mutex::new(()),
        });
        let spawned = std::thread::Builder::new().name("log-writer".into()).spawn(move || loop {
            if let Ok(lines) = queue.lines.lock() {
                // Wakes on the first line of a batch; the timeout only bounds a lost wake-up.
                let _ = queue.ready.wait_timeout_while(lines, Duration::from_millis(100), |l| l.is_empty());
            }
            // Lets a burst gather, so one write carries many lines.
            std::thread::sleep(Duration::from_millis(1));
            queue.write_out();
        });
        if spawned.is_err() {
            init(default_level);
            return;
        }
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            flush();
            default_hook(info);
        }));
        let _ = tracing_subscriber::fmt()
            .with_timer(MillisecondTime)
            .with_env_filter(filter(default_level))
            .with_target(false)
            .with_ansi(stderr_is_terminal())
            .with_writer(MakeQueued)
            .try_init();
    }

    /// Writes every line logged so far (batched logging); a no-op otherwise.
    pub fn flush() {
        if let Some(queue) = QUEUE.get() {
            queue.write_out();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::one_line;

        #[test]
        fn a_newline_from_the_network_cannot_start_a_log_line_of_its_own() {
            let forged = b"registered 1.2.3.4:5\n2026-11-25 09:12:03.481  INFO forged line\r\x1b[2J\n";
            let line = one_line(forged, false);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            assert_eq!(
                String::from_utf8_lossy(&line),
                "registered 1.2.3.4:5\\n2026-11-25 09:12:03.481  INFO forged line\\r\\x1b[2J\n"
            );
            let plain = b"2026-11-25 09:12:03.481  INFO put k (3 bytes)\tok\n";
            assert!(matches!(one_line(plain, false), std::borrow::Cow::Borrowed(_)), "plain lines are not copied");
            // A terminal's colour escapes stay when colours are on.
            assert_eq!(&one_line(b"\x1b[32mINFO\x1b[0m x\n", true)[..], b"\x1b[32mINFO\x1b[0m x\n");
        }
    }
}
