//! Guest linear memories that can be given back without stalling the rest of the process.
//!
//! wasmtime's default memory is one mapping per instance, unmapped when the instance is dropped.
//! Unmapping half a gigabyte of touched pages (an instance started from a million-key
//! snapshot, as every compaction off the step loop makes) holds the process's memory-map lock
//! for 70-110 ms; meanwhile the step loop's own guest cannot grow its memory (`mprotect` needs
//! that lock), and its step sleeps — the longest step-loop turns at 1M keys (up to 400 ms, with
//! under a millisecond of CPU) ended as a compaction dropped its instance. wasmtime's pooling
//! allocator does not help here: it returns pages with one `process_madvise` over the whole
//! memory, which holds the same lock (measured: no better).
//!
//! These memories are the same reservation (`PROT_NONE`, then `mprotect` as the guest grows,
//! with wasmtime's guard region after it), but on drop their pages are returned with
//! `madvise(MADV_DONTNEED)` 16 MiB at a time — on Linux 6.x that takes only the mapping's own
//! lock, and only briefly — before the then-empty reservation is unmapped.

use std::sync::Arc;

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// Pages are returned this many bytes at a time: each `madvise` holds its lock only briefly.
const RELEASE_CHUNK_BYTES: usize = 16 << 20;
/// Memory is made accessible this far ahead of the guest's size: `mprotect` needs the
/// memory-map lock for writing, and a step that grows the memory would otherwise wait for it
/// whenever another thread (a compaction reading or writing 100 MB) holds it — sampled at 1M
/// keys, every step-loop stall over 20 ms that was not a wait for a CPU was a step asleep in
/// `mprotect`. A 64 KiB grow then costs no system call 1,023 times in 1,024.
const COMMIT_AHEAD_BYTES: usize = 64 << 20;

/// Makes `ReleasedMemory`s (`Config::with_host_memory`; copy-on-write initialisation off, as
/// wasmtime maps its images only into memories of its own).
pub struct ReleasingMemoryCreator {
    /// The reservation when wasmtime names none (its proxy always names one).
    pub max_bytes: usize,
}

impl ReleasingMemoryCreator {
    pub fn shared(max_bytes: usize) -> Arc<dyn MemoryCreator> {
        Arc::new(ReleasingMemoryCreator { max_bytes })
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

/// One guest memory: `reserved` bytes of address space (plus `guard` bytes never accessible),
/// the first `committed` of them readable and writable, of which the guest's memory is `size`.
///
/// The part between `size` and `committed` is accessible though past the guest's size: a guest
/// that reads or writes there (a bug; safe Rust cannot) does so instead of trapping, what it
/// wrote is still there when the memory grows over it (so "new" pages may not be zero), and
/// whether such an access traps depends on the instance's growth history. It never reaches
/// anything but its own reservation, so the sandbox holds; the trade buys a step that never
/// waits for the memory-map lock.
///
/// Like wasmtime's own memories it has a guard region *before* the base too (`guard` bytes,
/// inaccessible), against code generation bugs.
struct ReleasedMemory {
    base: *mut u8,
    size: usize,
    committed: usize,
    reserved: usize,
    guard: usize,
    page: usize,
}

// SAFETY: the mapping is owned by this value alone; wasmtime serialises access to a memory.
unsafe impl Send for ReleasedMemory {}
// SAFETY: as above; `&self` methods only read plain fields.
unsafe impl Sync for ReleasedMemory {}

// SAFETY: `base` is page aligned, the accessible part is zero-filled anonymous memory, growth
// never moves it (the reservation is made up front) and `guard` bytes after the reservation
// stay inaccessible, as the compiled code's elided bounds checks require.
unsafe impl LinearMemory for ReleasedMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.reserved
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.reserved {
            wasmtime::bail!("a guest memory cannot grow past its {} reserved bytes", self.reserved);
        }
        let from = self.committed;
        if new_size > from {
            let to = new_size.saturating_add(COMMIT_AHEAD_BYTES).min(self.reserved).next_multiple_of(self.page);
            // SAFETY: [from, to) lies inside our own reservation.
            let made =
                unsafe { libc::mprotect(self.base.add(from).cast(), to - from, libc::PROT_READ | libc::PROT_WRITE) };
            if made != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            self.committed = to;
        }
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base
    }
}

impl Drop for ReleasedMemory {
    fn drop(&mut self) {
        let touched = self.committed;
        let mut at = 0;
        while at < touched {
            let len = (touched - at).min(RELEASE_CHUNK_BYTES);
            // SAFETY: inside our own mapping, which nobody uses any more.
            unsafe { libc::madvise(self.base.add(at).cast(), len, libc::MADV_DONTNEED) };
            at += len;
        }
        // SAFETY: the whole mapping made in `new_memory`: guard, reservation, guard.
        unsafe { libc::munmap(self.base.sub(self.guard).cast(), self.guard + self.reserved + self.guard) };
    }
}

// SAFETY: see `ReleasedMemory`.
unsafe impl MemoryCreator for ReleasingMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let page = page_size();
        let round = |bytes: usize| bytes.checked_next_multiple_of(page);
        let reserved = round(
            reserved_size_in_bytes
                .unwrap_or_else(|| maximum.unwrap_or(self.max_bytes).min(self.max_bytes))
                .max(minimum),
        );
        let guard = round(guard_size_in_bytes);
        let total = reserved.zip(guard).and_then(|(r, g)| r.checked_add(g)?.checked_add(g));
        let (Some(reserved), Some(guard), Some(total)) = (reserved, guard, total) else {
            return Err(format!("a guest memory of {minimum} bytes cannot be reserved: sizes overflow"));
        };
        // SAFETY: a fresh private anonymous mapping, placed by the kernel.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot reserve {total} bytes for a guest memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `guard` bytes into the mapping just made, which is longer.
        let base = unsafe { base.cast::<u8>().add(guard) };
        let mut memory = ReleasedMemory { base, size: 0, committed: 0, reserved, guard, page };
        memory.grow_to(minimum).map_err(|e| format!("cannot make a guest memory's first {minimum} bytes: {e}"))?;
        Ok(Box::new(memory))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(minimum: usize, reserved: usize) -> Box<dyn LinearMemory> {
        let creator = ReleasingMemoryCreator { max_bytes: 1 << 30 };
        let ty = MemoryType::new(0, None);
        creator.new_memory(ty, minimum, None, Some(reserved), 1 << 20).expect("memory")
    }

    #[test]
    fn a_memory_grows_in_place_zero_filled_and_never_past_its_reservation() {
        let mut memory = memory(65536, 64 << 20);
        let base = memory.as_ptr();
        // SAFETY: inside the accessible part.
        unsafe { base.add(65535).write(7) };
        memory.grow_to(32 << 20).expect("grows");
        assert_eq!(memory.as_ptr(), base, "growth never moves the memory");
        assert_eq!(memory.byte_size(), 32 << 20);
        // SAFETY: inside the accessible part.
        unsafe {
            assert_eq!(base.add(65535).read(), 7, "what was written stays");
            assert_eq!(base.add((32 << 20) - 1).read(), 0, "new pages are zero");
            base.add((32 << 20) - 1).write(1);
        }
        assert!(memory.grow_to((64 << 20) + 65536).is_err(), "not past the reservation");
        assert_eq!(memory.byte_size(), 32 << 20, "a refused growth changes nothing");
        drop(memory);
    }
}
