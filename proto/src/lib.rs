//! What the `waxos` client and the `waxosd` host share: the gRPC contract, generated from
//! `proto/waxos.proto` (one crate so the two can never disagree), and the log format.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("waxos.v1");

/// Logging shared by both binaries: every line timestamped to the millisecond, local time.
pub mod logging {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;
    use tracing_subscriber::EnvFilter;

    /// `2026-11-25 09:12:03.481`.
    struct MillisecondTime;

    impl FormatTime for MillisecondTime {
        fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
            write!(w, "{}", chrono::Local::now().format("%Y-%m-%d %H:%M:%S%.3f"))
        }
    }

    /// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise.
    pub fn init(default_level: &str) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
        let _ = tracing_subscriber::fmt()
            .with_timer(MillisecondTime)
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
}
