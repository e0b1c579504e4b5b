//! The WAL's writer thread. The step loop hands it what the WAL buffered (`Wal::take_for_sync`),
//! one hand-off at a time and in order; it writes each and makes it durable with one
//! `fdatasync`, then reports back. Meanwhile the step loop keeps stepping and buffering, so the
//! next hand-off carries every step that ran during this one's fsync (group commit across
//! steps). The step loop releases a step's messages and replies only when the report covering
//! that step's records has arrived: persist-before-send holds as before, without the step loop
//! ever waiting on the disk while there is work.

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};

use super::wal::HandOff;

/// A hand-off made durable (or not).
#[derive(Debug)]
pub struct Synced {
    /// The hand-off's number.
    pub ticket: u64,
    /// Why it could not be made durable, if it could not.
    pub result: Result<(), String>,
}

/// The writer thread's two ends.
pub struct Syncer {
    jobs: Sender<(u64, HandOff)>,
    done: Receiver<Synced>,
}

impl Syncer {
    /// Starts the thread; `wake` is called after each hand-off is done (to wake the step loop).
    pub fn start(wake: impl Fn() + Send + 'static) -> anyhow::Result<Syncer> {
        let (jobs, todo) = channel::<(u64, HandOff)>();
        let (report, done) = channel();
        std::thread::Builder::new().name("wal-sync".into()).spawn(move || {
            for (ticket, HandOff { file: segment, start, bytes, sync_dir_first }) in todo {
                let mut file: &File = &segment;
                let started = std::time::Instant::now();
                // A new segment's directory entry first: its records are durable only with it.
                let dir_synced = match &sync_dir_first {
                    Some(dir) => super::sync_dir(dir).map(|()| crate::crash_point::reach("wal.roll.after_dir_sync")),
                    None => Ok(()),
                };
                if let Err(e) = dir_synced {
                    let result = Err(format!("syncing the WAL directory for a new segment: {e:#}"));
                    if report.send(Synced { ticket, result }).is_err() {
                        return;
                    }
                    wake();
                    continue;
                }
                crate::crash_point::reach("wal.sync.before_write");
                let result = file
                    .write_all(&bytes)
                    .and_then(|()| {
                        crate::crash_point::reach("wal.sync.after_write");
                        file.sync_data()
                    })
                    .map_err(|e| {
                        // Cut what may not be on the disk off the file (and its cached pages)
                        // at once, before anything else runs: a restart must not replay it.
                        let cut = file.set_len(start).and_then(|()| file.sync_all());
                        format!(
                            "writing and syncing {} WAL bytes: {e} (cut back to {start} bytes: {cut:?})",
                            bytes.len()
                        )
                    });
                if result.is_ok() {
                    crate::crash_point::reach("wal.sync.after_fdatasync");
                    crate::metrics::wal_synced(bytes.len(), started.elapsed());
                }
                if report.send(Synced { ticket, result }).is_err() {
                    return;
                }
                wake();
            }
        })?;
        Ok(Syncer { jobs, done })
    }

    /// Hands `bytes` over, to be appended to `file` (whose durable length is `start`) and
    /// synced. False when the thread is gone.
    pub fn submit(&self, ticket: u64, hand_off: HandOff) -> bool {
        self.jobs.send((ticket, hand_off)).is_ok()
    }

    /// A finished hand-off, if one is reported.
    pub fn try_done(&self) -> Option<Synced> {
        self.done.try_recv().ok()
    }

    /// Waits for the next finished hand-off (None: the thread is gone).
    pub fn wait_done(&self) -> Option<Synced> {
        self.done.recv().ok()
    }
}
