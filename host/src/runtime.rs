//! The wasm runtime: one wasmtime `Engine`, the compiled guest, and live guest instances.
//!
//! It owns everything about running untrusted-ish guest code safely: compiled components are
//! cached on disk (compiling takes ~50 ms, loading a cached one ~0.3 ms); instances are made
//! from one `InstancePre` (imports type-checked once); each call runs under an epoch deadline
//! (a looping guest is stopped) and a memory limit; WASI is linked with nothing granted (no
//! files, no environment, no network). Any trap is returned as a `GuestCrash`, after which the
//! instance must be thrown away (wasmtime refuses to enter it again). Linear memories are
//! `crate::guest_memory`'s, so that growing and dropping them never stalls the step loop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::{Component, ComponentExportIndex, Instance, Linker, ResourceTable, TypedFunc};
use wasmtime::{Config as EngineConfig, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({ world: "replica-node", path: "../wit" });

pub use exports::waxos::replica::replica::Config as GuestConfig;
pub use waxos::replica::types::{
    Command, Effect, Envelope, Event, Member as GuestMember, MemberChange, Outcome, Request, Role,
};

/// Voters `ids` with no addresses, as a guest's first configuration (tests, benchmarks).
pub fn voters(ids: &[u32]) -> Vec<GuestMember> {
    ids.iter().map(|&id| GuestMember { id, address: String::new(), voter: true }).collect()
}

/// How often the epoch ticks.
pub const EPOCH_TICK_MS: u64 = 10;
/// A `step`, `snapshot` or `status` call running longer than this is a crash.
pub const CALL_DEADLINE_MS: u64 = 2_000;
/// `start` replays the WAL and may take longer.
pub const START_DEADLINE_MS: u64 = 60_000;
/// Guest linear memory limit.
pub const GUEST_MEMORY_BYTES_MAX: usize = 4 << 30;

/// A guest call that trapped, ran out of time or memory, or returned an error.
#[derive(Debug, thiserror::Error)]
#[error("guest crashed in {call}: {reason}")]
pub struct GuestCrash {
    /// Which export was being called.
    pub call: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// Per-store host state: WASI with nothing granted, and the resource limits.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The engine (one per host) and the linker every guest build is linked with.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    /// Where compiled builds are kept between starts; None: compile every build that enters.
    cache_dir: Option<PathBuf>,
}

/// One compiled, linked guest build, ready to instantiate.
#[derive(Clone)]
pub struct GuestBuild {
    engine: Engine,
    pre: ReplicaNodePre<HostState>,
    /// Where the build's optional `staging` exports are (builds before staged swaps have none).
    staging: Option<StagingExports>,
    /// Where the build came from (a path, or "swap").
    pub source: String,
    /// A hash of the build's bytes, shown by `status`.
    pub hash: String,
}

/// The `waxos:replica/staging` exports of a build (`crate::staging`).
#[derive(Clone)]
struct StagingExports {
    replay: ComponentExportIndex,
    handover_volatile: ComponentExportIndex,
    adopt: ComponentExportIndex,
}

/// The name of the optional staging interface.
const STAGING_INTERFACE: &str = "waxos:replica/staging@0.1.0";

impl StagingExports {
    /// The three functions, when the component exports the interface (with all three).
    fn find(component: &Component) -> Option<StagingExports> {
        let interface = component.get_export_index(None, STAGING_INTERFACE)?;
        let func = |name: &str| component.get_export_index(Some(&interface), name);
        Some(StagingExports {
            replay: func("replay")?,
            handover_volatile: func("handover-volatile")?,
            adopt: func("adopt")?,
        })
    }
}

/// FNV-1a, 64 bits: a stable short fingerprint of a build (not a security measure).
pub fn build_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Runtime {
    /// The engine (epoch interruption on, with its ticker thread) and the WASI linker with
    /// nothing granted.
    pub fn new(cache_dir: &Path) -> anyhow::Result<Runtime> {
        let mut cfg = EngineConfig::new();
        cfg.epoch_interruption(true);
        // Memories whose release does not stall the step loop (`crate::guest_memory`).
        cfg.memory_init_cow(false);
        cfg.with_host_memory(crate::guest_memory::ReleasingMemoryCreator::shared(GUEST_MEMORY_BYTES_MAX));
        let engine = Engine::new(&cfg).map_err(anyhow::Error::from)?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                ticker.increment_epoch();
            })
            .context("starting the epoch ticker thread")?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
        Ok(Runtime { engine, linker, cache_dir: Some(cache_dir.to_path_buf()) })
    }

    /// A runtime that never loads compiled code from disk. A host that runs only signed builds
    /// uses it: a compiled artifact is native code that no signature covers, and whoever can
    /// write the cache could make the host run code of their choosing under a verified build's
    /// name. It costs a compile per start (well under a second for the guest).
    pub fn without_disk_cache(mut self) -> Runtime {
        self.cache_dir = None;
        self
    }

    /// Reads and compiles the build at `path`.
    pub fn load(&self, path: &Path) -> anyhow::Result<GuestBuild> {
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read the guest build {} (build it with `just build`, or pass --guest PATH)", path.display())
        })?;
        self.compile(&bytes, &path.display().to_string())
    }

    /// Compiles (or loads from the cache) and links a build; refuses anything that is not a
    /// component exporting the `replica-node` world.
    pub fn compile(&self, bytes: &[u8], source: &str) -> anyhow::Result<GuestBuild> {
        let component = match &self.cache_dir {
            Some(cache_dir) => load_component(&self.engine, bytes, source, cache_dir)?,
            None => Component::new(&self.engine, bytes)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{source} is not a valid wasm component"))?,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{source} does not link against this host (it may import more than WASI)"))?;
        let pre = ReplicaNodePre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{source} does not export the waxos replica-node world"))?;
        let staging = StagingExports::find(&component);
        Ok(GuestBuild {
            engine: self.engine.clone(),
            pre,
            staging,
            source: source.to_string(),
            hash: build_hash(bytes),
        })
    }
}

impl GuestBuild {
    /// A fresh instance (empty memory); call `start` on it next.
    pub fn instantiate(&self) -> Result<Guest, GuestCrash> {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new().inherit_stderr().build();
        let limits = StoreLimitsBuilder::new().memory_size(GUEST_MEMORY_BYTES_MAX).instances(4).build();
        let mut store = Store::new(&self.engine, HostState { wasi, table: ResourceTable::new(), limits });
        store.limiter(|s| &mut s.limits);
        // What one call may hand the host (a step's effects, a snapshot): wasmtime's default of
        // 128 MiB is less than a large state's snapshot; the guest's own memory bound is ours.
        store.set_hostcall_fuel(GUEST_MEMORY_BYTES_MAX);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(START_DEADLINE_MS / EPOCH_TICK_MS);
        let instance = self.pre.instance_pre().instantiate(&mut store).map_err(|e| crash("instantiate", e))?;
        let node = ReplicaNode::new(&mut store, &instance).map_err(|e| crash("instantiate", e))?;
        Ok(Guest { store, node, instance, staging: self.staging.clone() })
    }

    /// True when the build exports the staged swap (`crate::staging`).
    pub fn supports_staging(&self) -> bool {
        self.staging.is_some()
    }
}

fn crash(call: &'static str, e: wasmtime::Error) -> GuestCrash {
    // The cause (a trap's kind: "interrupt" for a missed deadline, out of bounds, …) is at the
    // end of the chain; the first lines say where in the guest.
    let cause = e.root_cause().to_string();
    let whereabouts = format!("{e:?}").lines().take(3).collect::<Vec<_>>().join(" | ");
    let reason = if whereabouts.contains(&cause) { whereabouts } else { format!("{cause} | {whereabouts}") };
    GuestCrash { call, reason }
}

/// Compiles a build, or loads a cached compilation keyed by its bytes and the engine.
fn load_component(engine: &Engine, bytes: &[u8], source: &str, cache_dir: &Path) -> anyhow::Result<Component> {
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        bytes.hash(&mut h);
        engine.precompile_compatibility_hash().hash(&mut h);
        h.finish()
    };
    let cached = cache_dir.join(format!("{key:016x}.cwasm"));
    if let Ok(file) = std::fs::read(&cached) {
        match cache_payload(&file) {
            // SAFETY: the bytes are exactly what `Component::serialize` of this same engine
            // configuration wrote (the key includes the compatibility hash; the checksum proves
            // the file whole) into our own data dir.
            Some(serialized) => match unsafe { Component::deserialize(engine, serialized) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("ignoring unusable compiled-guest cache {}: {e}", cached.display()),
            },
            None => tracing::warn!(
                "compiled-guest cache {} is damaged (bad header or checksum): compiling again",
                cached.display()
            ),
        }
    }
    let component = Component::new(engine, bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{source} is not a valid wasm component"))?;
    if let Ok(serialized) = component.serialize() {
        // Best effort: a cache that cannot be written only costs the next start a compile.
        if let Err(e) = crate::storage::write_atomically(&cached, &cache_file(&serialized)) {
            tracing::warn!("cannot write the compiled-guest cache {}: {e:#}", cached.display());
        }
    }
    Ok(component)
}

/// Magic of a compiled-guest cache file: `WAXCWSM1`, length (u64 LE), CRC32C (u32 LE), bytes.
const CACHE_MAGIC: &[u8; 8] = b"WAXCWSM1";
const CACHE_HEADER_BYTES: usize = 8 + 8 + 4;

/// A cache file holding `serialized`.
fn cache_file(serialized: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(CACHE_HEADER_BYTES + serialized.len());
    file.extend_from_slice(CACHE_MAGIC);
    file.extend_from_slice(&(serialized.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32c::crc32c(serialized).to_le_bytes());
    file.extend_from_slice(serialized);
    file
}

/// The serialized component in a cache file, if the file is whole (magic, length, checksum):
/// deserializing is unsafe, so nothing torn or damaged may reach it.
fn cache_payload(file: &[u8]) -> Option<&[u8]> {
    if file.len() < CACHE_HEADER_BYTES || &file[..8] != CACHE_MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(file[8..16].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(file[16..20].try_into().ok()?);
    let payload = file.get(CACHE_HEADER_BYTES..)?;
    (payload.len() == len && crc32c::crc32c(payload) == crc).then_some(payload)
}

/// A live guest instance. Not `Sync`: one thread at a time owns it (the step loop; a staged
/// instance is prepared on a thread of its own and handed over).
pub struct Guest {
    store: Store<HostState>,
    node: ReplicaNode,
    instance: Instance,
    staging: Option<StagingExports>,
}

/// Drops an instance on a thread of its own, at a lower priority: returning half a gigabyte of
/// linear memory to the kernel takes tens of milliseconds of CPU, which the step loop must not
/// spend between two requests. Dropped where it is if no thread can be started.
pub fn dispose(guest: Guest) {
    let spawned = std::thread::Builder::new().name("guest-drop".into()).spawn(move || {
        crate::staging::lower_priority();
        drop(guest);
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to drop a guest instance ({e}): the step loop drops it");
    }
}

/// `replay` and `adopt`: records or a hand-over in, log effects or a refusal out.
type StagingFunc<P> = TypedFunc<(P,), (Result<Vec<Effect>, String>,)>;

impl Guest {
    fn arm(&mut self, deadline_ms: u64) {
        self.store.set_epoch_deadline(deadline_ms.div_ceil(EPOCH_TICK_MS));
    }

    /// `start(config, snapshot, wal)`: `Ok(Err(reason))` when the guest refused the state.
    pub fn start(
        &mut self,
        config: &GuestConfig,
        snapshot: Option<&[u8]>,
        wal: &[Vec<u8>],
    ) -> Result<Result<Vec<Effect>, String>, GuestCrash> {
        self.arm(START_DEADLINE_MS);
        self.node
            .waxos_replica_replica()
            .call_start(&mut self.store, config, snapshot, wal)
            .map_err(|e| crash("start", e))
    }

    /// One step.
    pub fn step(&mut self, now_ms: u64, events: &[Event]) -> Result<Vec<Effect>, GuestCrash> {
        self.arm(CALL_DEADLINE_MS);
        self.node.waxos_replica_replica().call_step(&mut self.store, now_ms, events).map_err(|e| crash("step", e))
    }

    /// The guest's durable state (with `handover`, its volatile state too, for a hot swap).
    pub fn snapshot(&mut self, handover: bool) -> Result<Vec<u8>, GuestCrash> {
        self.snapshot_within(handover, CALL_DEADLINE_MS)
    }

    fn snapshot_within(&mut self, handover: bool, deadline_ms: u64) -> Result<Vec<u8>, GuestCrash> {
        self.arm(deadline_ms);
        self.node.waxos_replica_replica().call_snapshot(&mut self.store, handover).map_err(|e| crash("snapshot", e))
    }

    /// The guest's durable state, taken off the step loop (a compaction): under the start
    /// deadline, as a state of a million keys on a machine busy with five hosts' compactions can
    /// take more than the step loop's call deadline, and nothing waits on it meanwhile.
    pub fn snapshot_off_loop(&mut self) -> Result<Vec<u8>, GuestCrash> {
        self.snapshot_within(false, START_DEADLINE_MS)
    }

    /// The guest's status JSON.
    pub fn status(&mut self) -> Result<String, GuestCrash> {
        self.arm(CALL_DEADLINE_MS);
        self.node.waxos_replica_replica().call_status(&mut self.store).map_err(|e| crash("status", e))
    }

    fn staging(&self, call: &'static str) -> Result<&StagingExports, GuestCrash> {
        self.staging.as_ref().ok_or(GuestCrash { call, reason: "this build has no staging exports".into() })
    }

    /// `staging.replay(wal)`: a staged instance catches up with records persisted after those it
    /// started from. `Ok(Err(reason))` when it refused a record.
    pub fn replay(&mut self, wal: &[Vec<u8>]) -> Result<Result<Vec<Effect>, String>, GuestCrash> {
        let index = self.staging("replay")?.replay;
        self.arm(START_DEADLINE_MS);
        let func: StagingFunc<&[Vec<u8>]> =
            self.instance.get_typed_func(&mut self.store, index).map_err(|e| crash("replay", e))?;
        func.call(&mut self.store, (wal,)).map(|(r,)| r).map_err(|e| crash("replay", e))
    }

    /// `staging.handover-volatile()`: the volatile state, for `adopt` on a staged instance.
    pub fn handover_volatile(&mut self) -> Result<Vec<u8>, GuestCrash> {
        let index = self.staging("handover-volatile")?.handover_volatile;
        self.arm(CALL_DEADLINE_MS);
        let func: TypedFunc<(), (Vec<u8>,)> =
            self.instance.get_typed_func(&mut self.store, index).map_err(|e| crash("handover-volatile", e))?;
        func.call(&mut self.store, ()).map(|(bytes,)| bytes).map_err(|e| crash("handover-volatile", e))
    }

    /// `staging.adopt(volatile)`: `Ok(Err(reason))` when the instance refused the hand-over
    /// (its durable state is not the old instance's), with nothing changed.
    pub fn adopt(&mut self, volatile: &[u8]) -> Result<Result<Vec<Effect>, String>, GuestCrash> {
        let index = self.staging("adopt")?.adopt;
        self.arm(CALL_DEADLINE_MS);
        let func: StagingFunc<&[u8]> =
            self.instance.get_typed_func(&mut self.store, index).map_err(|e| crash("adopt", e))?;
        func.call(&mut self.store, (volatile,)).map(|(r,)| r).map_err(|e| crash("adopt", e))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cached_files(dir: &Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A damaged or torn cache file never reaches the unsafe deserialize: the build is compiled
    /// again and the cache rewritten whole.
    #[test]
    fn a_damaged_compiled_guest_cache_is_compiled_again_not_loaded() {
        let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/waxos_guest.wasm");
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = Runtime::new(dir.path()).expect("engine");
        runtime.load(&guest).expect("guest (run `just build`)");
        let files = cached_files(dir.path());
        assert_eq!(files.len(), 1, "one cache file");
        let whole = std::fs::read(&files[0]).expect("read");
        assert!(cache_payload(&whole).is_some());
        for damage in ["flip", "torn"] {
            let mut bad = whole.clone();
            match damage {
                "flip" => bad[whole.len() / 2] ^= 0x40,
                _ => bad.truncate(whole.len() / 3),
            }
            assert!(cache_payload(&bad).is_none(), "{damage} must be caught");
            std::fs::write(&files[0], &bad).expect("write");
            let build = runtime.load(&guest).expect("loads by compiling again");
            assert!(build.instantiate().is_ok(), "{damage}: the recompiled guest instantiates");
            let rewritten = std::fs::read(&files[0]).expect("read");
            assert!(cache_payload(&rewritten).is_some(), "{damage}: cache rewritten whole");
        }
    }
}
