//! A data dir whose state cannot be trusted any more, and what a start does with it.
//!
//! After a failed `fdatasync` the kernel may have dropped the dirty pages (so the disk lacks
//! records the WAL seemed to hold) or still serve them from its cache to a restart, which
//! would then act on records that were never durable and may vanish later. PostgreSQL learned
//! that retrying the fsync is not enough. So the host marks its data dir before it stops
//! (`mark`, best effort: a file outside `wal/`), and the next start does not replay: it moves
//! the WAL and snapshot aside into `lost-<unix-ms>/` (kept for forensics, never read again) and
//! rejoins, as a wiped host does — the rest of the cluster brings it back.
//!
//! Order on start, each step safe to crash after: the roster is saved with the rejoin flag
//! first (the caller), then the state moves aside, then the mark goes.

use std::path::{Path, PathBuf};

use anyhow::Context;

fn marker(dir: &Path) -> PathBuf {
    dir.join("wal-failed")
}

/// Marks `dir`: its WAL failed a write or sync for `reason`.
pub fn mark(dir: &Path, reason: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.3f");
    super::write_atomically(&marker(dir), format!("{now} {reason}\n").as_bytes())
}

/// Why `dir` was marked, if it was.
pub fn marked(dir: &Path) -> Option<String> {
    std::fs::read_to_string(marker(dir)).ok().map(|s| s.trim_end().to_string())
}

/// Moves the WAL and the snapshot of a marked `dir` aside and removes the mark; returns where
/// they went. Call only after the roster says the host rejoins.
pub fn set_aside(dir: &Path) -> anyhow::Result<PathBuf> {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let aside = dir.join(format!("lost-{ms}"));
    super::create_dir_durably(&aside)?;
    for name in ["wal", "snapshot"] {
        let from = dir.join(name);
        if from.exists() {
            std::fs::rename(&from, aside.join(name))
                .with_context(|| format!("moving {} into {}", from.display(), aside.display()))?;
        }
    }
    super::sync_dir(&aside)?;
    super::sync_dir(dir)?;
    std::fs::remove_file(marker(dir)).with_context(|| format!("removing {}", marker(dir).display()))?;
    super::sync_dir(dir)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_dir_sets_its_state_aside_and_loses_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(marked(dir.path()), None);
        std::fs::create_dir(dir.path().join("wal")).expect("mkdir");
        std::fs::write(dir.path().join("wal/0000000000000000.wal"), b"records").expect("write");
        std::fs::write(dir.path().join("snapshot"), b"state").expect("write");
        mark(dir.path(), "fdatasync: EIO").expect("mark");
        assert!(marked(dir.path()).is_some_and(|why| why.ends_with("fdatasync: EIO")));
        let aside = set_aside(dir.path()).expect("set aside");
        assert!(!dir.path().join("wal").exists() && !dir.path().join("snapshot").exists());
        assert_eq!(std::fs::read(aside.join("wal/0000000000000000.wal")).expect("kept"), b"records");
        assert_eq!(marked(dir.path()), None);
    }
}
