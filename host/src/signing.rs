//! Signed guest builds: which builds this host agrees to run. It owns the trust policy (the
//! public keys of `--trusted-keys`, or `--allow-unsigned` for development), the check of a
//! build's detached signature against it, and the signature's place next to the build a swap
//! installed (`current.wasm.sig`, installed with it, so a restart checks the build again). The
//! guest is the replicated state machine's code — whoever can make a host run a build decides
//! what every acknowledged write means — so every way a build enters is checked here, before
//! wasmtime parses a single byte of it: the start-up build (`--guest`, or the one an earlier swap
//! installed), `Admin.SwapGuest`, and `--watch`.
//!
//! Why a detached signature (`<build>.wasm.sig`; formats in `waxos_proto::signature`): the
//! signed bytes are exactly the component's bytes, checked before anything parses them, and the
//! hash `status` shows is the hash of what was signed. A signature embedded in a custom section
//! would have to sign "everything but that section", found by parsing the untrusted component
//! first.
//!
//! Policy: a host needs `--trusted-keys FILE` (ed25519 public keys, one per line in hex, `#`
//! comments) or `--allow-unsigned`; with neither it refuses to start and says which to pass.
//! The two exclude each other: with trusted keys every build must verify; with
//! `--allow-unsigned` none is checked and each one entering is logged as unverified. The keys
//! are read once, at start: to trust or revoke a key, edit the file and restart the host (a
//! rolling restart keeps the cluster serving).
//!
//! Crash safety of an installed build: a swap writes `next.wasm` and `next.wasm.sig`; the step
//! loop installs them (`install_next`) by renaming the signature first and the build second,
//! with a directory sync between. A crash between the two renames leaves the old
//! `current.wasm` with the new `current.wasm.sig` and `next.wasm` still there: the start-up
//! check finds that `current.wasm.sig` verifies `next.wasm` and finishes the install (safe: a
//! signature verifies only the bytes it was made for).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ed25519_dalek::VerifyingKey;
use waxos_proto::signature::{key_id, parse_public_keys, GuestSignature};

pub use waxos_proto::signature::signature_path;

use crate::runtime::{build_hash, GuestBuild, Runtime};

/// Which builds this host runs.
#[derive(Debug)]
pub enum Policy {
    /// Only builds signed by one of these keys.
    Trusted(TrustedKeys),
    /// Any build, unverified (`--allow-unsigned`, development only).
    AllowUnsigned,
}

/// The public keys of `--trusted-keys`, and the file they came from (named in refusals).
#[derive(Debug)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    source: PathBuf,
}

impl TrustedKeys {
    /// Reads a trusted-keys file; an unreadable, malformed or empty file is an error.
    pub fn load(path: &Path) -> anyhow::Result<TrustedKeys> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the trusted keys {}", path.display()))?;
        let keys = parse_public_keys(&text).with_context(|| format!("trusted keys {}", path.display()))?;
        anyhow::ensure!(
            !keys.is_empty(),
            "the trusted keys {} list no key: no guest build could ever run (add a public key from `waxos keygen`)",
            path.display()
        );
        Ok(TrustedKeys { keys, source: path.to_path_buf() })
    }

    /// The ids of the keys, for the log.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(key_id).collect()
    }
}

/// Why a build is refused. The text is meant for the operator: it says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature came with the build.
    #[error("it is unsigned: sign it with `waxos sign --key KEY BUILD.wasm` (which writes BUILD.wasm.sig next to it)")]
    Unsigned,
    /// The signature file is not one.
    #[error("its signature cannot be read: {0}")]
    Malformed(String),
    /// Signed by a key this host does not trust.
    #[error("it is signed by key {key_id}, which is not among the trusted keys of {trusted}")]
    UnknownKey {
        /// The signer's key id.
        key_id: String,
        /// The trusted-keys file.
        trusted: String,
    },
    /// The signature does not verify: the bytes changed after signing, or it is another build's.
    #[error(
        "its signature by key {key_id} does not match its bytes (the build was changed after it was signed, or the signature is another build's)"
    )]
    BadSignature {
        /// The signer's key id.
        key_id: String,
    },
}

/// A build that passed: who signed it (`None` under `--allow-unsigned`) and what checking took.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The key id of the signer, if checked.
    pub key_id: Option<String>,
    /// How long the check took (parsing the signature, hashing the build, verifying).
    pub elapsed: Duration,
}

impl Policy {
    /// The policy of the command line; neither option is an error that says what to pass.
    pub fn from_args(trusted_keys: Option<&Path>, allow_unsigned: bool) -> anyhow::Result<Policy> {
        match (trusted_keys, allow_unsigned) {
            (Some(_), true) => anyhow::bail!("--trusted-keys and --allow-unsigned exclude each other: pass one"),
            (Some(path), false) => {
                let keys = TrustedKeys::load(path)?;
                tracing::info!(
                    "guest builds must be signed by one of {} trusted keys of {}: {}",
                    keys.keys.len(),
                    path.display(),
                    keys.ids().join(", ")
                );
                Ok(Policy::Trusted(keys))
            }
            (None, true) => {
                tracing::warn!(
                    "!!! --allow-unsigned: guest builds are NOT verified; any build that reaches this host (at start, by \
                     swap, by --watch) will run as the replicated state machine. For development only: use \
                     --trusted-keys FILE anywhere else !!!"
                );
                Ok(Policy::AllowUnsigned)
            }
            (None, false) => anyhow::bail!(
                "no trusted keys for guest builds: pass --trusted-keys FILE (ed25519 public keys, one per line in hex; \
                 `waxos keygen --out DIR` makes a key pair, `just build` makes the dev one and .cluster/trusted-keys), \
                 or --allow-unsigned to run unverified builds (development only)"
            ),
        }
    }

    /// Checks `build` against its detached `signature` (the signature file's bytes), without
    /// logging.
    pub fn check(&self, build: &[u8], signature: Option<&[u8]>) -> Result<Verified, Refusal> {
        let started = Instant::now();
        let trusted = match self {
            Policy::AllowUnsigned => return Ok(Verified { key_id: None, elapsed: started.elapsed() }),
            Policy::Trusted(trusted) => trusted,
        };
        let signature = match signature {
            None | Some([]) => return Err(Refusal::Unsigned),
            Some(s) => GuestSignature::parse(s).map_err(|e| Refusal::Malformed(e.to_string()))?,
        };
        let mut candidates = trusted.keys.iter().filter(|k| key_id(k) == signature.key_id).peekable();
        if candidates.peek().is_none() {
            return Err(Refusal::UnknownKey {
                key_id: signature.key_id,
                trusted: trusted.source.display().to_string(),
            });
        }
        // Strict verification: no malleable signatures, no small-order keys. Two trusted keys
        // sharing an id (a 64-bit prefix) are both tried.
        if candidates.any(|k| k.verify_strict(build, &signature.signature).is_ok()) {
            Ok(Verified { key_id: Some(signature.key_id), elapsed: started.elapsed() })
        } else {
            Err(Refusal::BadSignature { key_id: signature.key_id })
        }
    }

    /// `check`, logged: the signer and the time it took, or why the build is refused.
    pub fn verify(&self, build: &[u8], signature: Option<&[u8]>, source: &str) -> Result<Verified, Refusal> {
        let result = self.check(build, signature);
        log_check(build, source, &result);
        result
    }
}

/// The log line of a check: the signer and the time it took, or why the build is refused.
fn log_check(build: &[u8], source: &str, result: &Result<Verified, Refusal>) {
    let hash = build_hash(build);
    match result {
        Ok(Verified { key_id: Some(id), elapsed }) => tracing::info!(
            "signature of {hash} by key {id} verified in {:.3} ms ({source}, {} bytes)",
            elapsed.as_secs_f64() * 1e3,
            build.len()
        ),
        Ok(Verified { key_id: None, .. }) => {
            tracing::warn!("build {hash} ({source}) runs UNVERIFIED: --allow-unsigned")
        }
        Err(refusal) => tracing::warn!("build {hash} ({source}) refused: {refusal}"),
    }
}

/// The signature file next to `build`: its bytes, or `None` if there is none.
pub fn read_signature(build: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let path = signature_path(build);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the signature {}", path.display())),
    }
}

/// The build a host starts with, checked and compiled: the one a swap installed
/// (`<guest_dir>/current.wasm`, checked against `current.wasm.sig`), if any, else `default`
/// (checked against `<default>.sig`). A refused build stops the start with an error that says
/// why and what to do.
pub fn startup_build(
    runtime: &Runtime,
    policy: &Policy,
    guest_dir: &Path,
    default: &Path,
) -> anyhow::Result<(PathBuf, GuestBuild)> {
    let current = guest_dir.join("current.wasm");
    let (path, bytes) = if current.exists() {
        tracing::info!(
            "running the guest build installed by a hot swap ({}); swap again to change it",
            current.display()
        );
        (current.clone(), installed_bytes(policy, guest_dir)?)
    } else {
        let bytes = std::fs::read(default).with_context(|| {
            format!(
                "cannot read the guest build {} (build it with `just build`, or pass --guest PATH)",
                default.display()
            )
        })?;
        let signature = read_signature(default)?;
        if let Err(refusal) = policy.verify(&bytes, signature.as_deref(), &default.display().to_string()) {
            anyhow::bail!(
                "guest build {} (build {}) refused: {refusal}{}",
                default.display(),
                build_hash(&bytes),
                if signature.is_none() {
                    format!(" (no {})", signature_path(default).display())
                } else {
                    String::new()
                }
            );
        }
        (default.to_path_buf(), bytes)
    };
    let build = runtime.compile(&bytes, &path.display().to_string())?;
    Ok((path, build))
}

/// The bytes of the installed `current.wasm`, verified; finishes an install a crash
/// interrupted between its two renames (see the module doc).
fn installed_bytes(policy: &Policy, guest_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let current = guest_dir.join("current.wasm");
    let next = guest_dir.join("next.wasm");
    let bytes = std::fs::read(&current).with_context(|| format!("cannot read {}", current.display()))?;
    let signature = read_signature(&current)?;
    let source = current.display().to_string();
    let refusal = match policy.check(&bytes, signature.as_deref()) {
        Ok(verified) => {
            log_check(&bytes, &source, &Ok(verified));
            return Ok(bytes);
        }
        Err(refusal) => refusal,
    };
    if let Ok(next_bytes) = std::fs::read(&next) {
        if policy.check(&next_bytes, signature.as_deref()).is_ok() {
            tracing::warn!(
                "{} is signed by {}: a swap was interrupted between installing the signature and the build; finishing it",
                next.display(),
                signature_path(&current).display()
            );
            std::fs::rename(&next, &current).with_context(|| format!("installing {}", current.display()))?;
            crate::storage::sync_dir(guest_dir)?;
            log_check(&next_bytes, &source, &policy.check(&next_bytes, signature.as_deref()));
            return Ok(next_bytes);
        }
    }
    log_check(&bytes, &source, &Err(refusal.clone()));
    anyhow::bail!(
        "the guest build installed by an earlier hot swap, {source} (build {}), is refused: {refusal}. To start \
         from the --guest build instead, remove {source} and {}",
        build_hash(&bytes),
        signature_path(&current).display()
    )
}

/// Installs the swapped-in `next.wasm` (and its signature, if any) as `current.wasm`: the
/// signature first, a directory sync, then the build (see the module doc for why this order).
/// The caller syncs the directory afterwards.
pub fn install_next(guest_dir: &Path) -> anyhow::Result<()> {
    let next = guest_dir.join("next.wasm");
    let current = guest_dir.join("current.wasm");
    let (next_signature, current_signature) = (signature_path(&next), signature_path(&current));
    match std::fs::rename(&next_signature, &current_signature) {
        Ok(()) => {}
        // An unverified build (`--allow-unsigned`): no stale signature may stay next to it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::remove_file(&current_signature) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", current_signature.display()))
            }
            _ => {}
        },
        Err(e) => return Err(e).with_context(|| format!("installing {}", current_signature.display())),
    }
    crate::storage::sync_dir(guest_dir)?;
    crate::crash_point::reach("swap.after_signature_install");
    std::fs::rename(&next, &current).with_context(|| format!("installing {}", current.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use waxos_proto::signature::{public_key_text, GuestSignature};

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn policy_trusting(keys: &[&SigningKey], dir: &Path) -> Policy {
        let path = dir.join("trusted-keys");
        let text: String = keys
            .iter()
            .map(|k| format!("# key {}\n{}\n", key_id(&k.verifying_key()), public_key_text(&k.verifying_key())))
            .collect();
        std::fs::write(&path, text).expect("write");
        Policy::from_args(Some(&path), false).expect("policy")
    }

    #[test]
    fn verify_accepts_only_exact_bytes_signed_by_a_trusted_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (trusted, other) = (key(1), key(2));
        let policy = policy_trusting(&[&key(3), &trusted], dir.path());
        let build = b"\0asm pretend component bytes".to_vec();
        let good = GuestSignature::sign(&trusted, &build).to_text();
        let verified = policy.verify(&build, Some(good.as_bytes()), "test").expect("a trusted signature");
        assert_eq!(verified.key_id, Some(key_id(&trusted.verifying_key())));

        assert_eq!(policy.check(&build, None).err(), Some(Refusal::Unsigned));
        assert_eq!(policy.check(&build, Some(b"")).err(), Some(Refusal::Unsigned));
        let mut tampered = build.clone();
        tampered[3] ^= 1;
        assert!(matches!(policy.check(&tampered, Some(good.as_bytes())), Err(Refusal::BadSignature { .. })));
        let unknown = GuestSignature::sign(&other, &build).to_text();
        let refusal = policy.check(&build, Some(unknown.as_bytes())).expect_err("unknown key");
        assert!(matches!(refusal, Refusal::UnknownKey { .. }));
        assert!(refusal.to_string().contains(&key_id(&other.verifying_key())), "{refusal}");
        // A trusted key's id on another key's signature is a bad signature, not a pass.
        let mut forged = GuestSignature::sign(&other, &build);
        forged.key_id = key_id(&trusted.verifying_key());
        assert!(matches!(policy.check(&build, Some(forged.to_text().as_bytes())), Err(Refusal::BadSignature { .. })));
        assert!(matches!(policy.check(&build, Some(b"garbage")), Err(Refusal::Malformed(_))));
        // The signature of another build.
        let elsewhere = GuestSignature::sign(&trusted, b"another build").to_text();
        assert!(matches!(policy.check(&build, Some(elsewhere.as_bytes())), Err(Refusal::BadSignature { .. })));
    }

    #[test]
    fn a_host_needs_trusted_keys_or_allow_unsigned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let none = Policy::from_args(None, false).expect_err("refused");
        assert!(none.to_string().contains("--trusted-keys") && none.to_string().contains("--allow-unsigned"));
        assert!(Policy::from_args(Some(&dir.path().join("trusted-keys")), true).is_err());
        assert!(Policy::from_args(Some(&dir.path().join("missing")), false).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing\n").expect("write");
        assert!(Policy::from_args(Some(&empty), false).is_err_and(|e| e.to_string().contains("list no key")));
        let unsigned = Policy::from_args(None, true).expect("allow-unsigned");
        assert!(unsigned.check(b"anything", None).is_ok_and(|v| v.key_id.is_none()));
    }

    /// A crash between the two renames of `install_next` leaves the old build with the new
    /// signature; the start-up check finishes the install instead of refusing to start.
    #[test]
    fn an_install_interrupted_between_its_renames_is_finished_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = key(5);
        let policy = policy_trusting(&[&signer], dir.path());
        let guest_dir = dir.path().join("guest");
        std::fs::create_dir_all(&guest_dir).expect("mkdir");
        let (old, new) = (b"old build".to_vec(), b"new build".to_vec());
        let current = guest_dir.join("current.wasm");
        std::fs::write(&current, &old).expect("write");
        std::fs::write(signature_path(&current), GuestSignature::sign(&signer, &old).to_text()).expect("write");
        assert_eq!(installed_bytes(&policy, &guest_dir).expect("old verifies"), old);
        // The swap's files, then the first rename only.
        let next = guest_dir.join("next.wasm");
        std::fs::write(&next, &new).expect("write");
        std::fs::write(signature_path(&next), GuestSignature::sign(&signer, &new).to_text()).expect("write");
        std::fs::rename(signature_path(&next), signature_path(&current)).expect("rename");
        assert_eq!(installed_bytes(&policy, &guest_dir).expect("finished"), new);
        assert!(!next.exists());
        assert_eq!(std::fs::read(&current).expect("read"), new);
        // A whole install afterwards.
        std::fs::write(&next, &old).expect("write");
        std::fs::write(signature_path(&next), GuestSignature::sign(&signer, &old).to_text()).expect("write");
        install_next(&guest_dir).expect("install");
        assert_eq!(installed_bytes(&policy, &guest_dir).expect("verifies"), old);
        // A tampered installed build is refused, and says what to do.
        std::fs::write(&current, b"0ld build").expect("write");
        let e = installed_bytes(&policy, &guest_dir).expect_err("tampered");
        assert!(e.to_string().contains("does not match") && e.to_string().contains("remove"), "{e:#}");
    }
}
