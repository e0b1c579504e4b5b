//! `waxos keygen` and `waxos sign`: the operator's side of signed guest builds. A host runs only
//! builds signed by a key of its `--trusted-keys` file (see `waxos_host::signing`); the file
//! formats are `waxos_proto::signature`'s. Both commands work offline: no host is contacted.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use rand::TryRng;
use waxos_proto::signature::{
    key_id, parse_private_key, private_key_text, public_key_text, signature_path, GuestSignature,
};

use crate::commands::{EXIT_FAILURE, EXIT_OK};

/// `waxos keygen --out DIR [--name NAME]`: writes `DIR/NAME.key` (private, mode 0600) and
/// `DIR/NAME.pub` (a line a host's trusted-keys file can hold), never over existing files, and
/// prints the public key.
pub fn keygen(out: &Path, name: &str) -> i32 {
    match try_keygen(out, name) {
        Ok((private, public, key)) => {
            eprintln!(
                "waxos: wrote {} (private: keep it secret) and {}; key id {}. Trust it on a host by adding the public \
                 key to the file of its --trusted-keys",
                private.display(),
                public.display(),
                key_id(&key.verifying_key())
            );
            outln!("{}", public_key_text(&key.verifying_key()));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("waxos: keygen: {e:#}");
            EXIT_FAILURE
        }
    }
}

fn try_keygen(out: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf, SigningKey)> {
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--name must be letters, digits, '-' or '_'"
    );
    let mut seed = [0u8; 32];
    rand::rngs::SysRng.try_fill_bytes(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let (private, public) = (out.join(format!("{name}.key")), out.join(format!("{name}.pub")));
    for path in [&private, &public] {
        anyhow::ensure!(!path.exists(), "{} exists already: not overwriting a key", path.display());
    }
    write_new(&private, private_key_text(&key).as_bytes(), 0o600)?;
    let public_text = format!(
        "# waxos guest-signing key {name}, key id {}\n{}\n",
        key_id(&key.verifying_key()),
        public_key_text(&key.verifying_key())
    );
    write_new(&public, public_text.as_bytes(), 0o644)?;
    Ok((private, public, key))
}

/// Creates `path` (it must not exist) with `mode` from the start, so a private key is never
/// readable by others, not even for a moment.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// `waxos sign --key KEY BUILD`: writes `BUILD.sig`, the detached signature of the exact bytes
/// of BUILD.
pub fn sign(key: &Path, build: &Path) -> i32 {
    match try_sign(key, build) {
        Ok((path, id)) => {
            eprintln!("waxos: signed {} with key {id}: {}", build.display(), path.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("waxos: sign: {e:#}");
            EXIT_FAILURE
        }
    }
}

fn try_sign(key: &Path, build: &Path) -> anyhow::Result<(PathBuf, String)> {
    let text =
        std::fs::read_to_string(key).map_err(|e| anyhow::anyhow!("cannot read the key {}: {e}", key.display()))?;
    let key = parse_private_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let bytes = std::fs::read(build).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", build.display()))?;
    let signature = GuestSignature::sign(&key, &bytes);
    let path = signature_path(build);
    // Whole or not at all: a reader (a host's --watch) never sees half a signature.
    let tmp = signature_path(&path.with_extension("sig-tmp"));
    std::fs::write(&tmp, signature.to_text())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok((path, signature.key_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_then_sign_writes_a_signature_that_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (private, public, key) = try_keygen(dir.path(), "test").expect("keygen");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&private).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the private key is for its owner only");
        }
        assert!(try_keygen(dir.path(), "test").is_err(), "never overwrites a key");
        let keys = waxos_proto::signature::parse_public_keys(&std::fs::read_to_string(&public).expect("read"))
            .expect("the .pub file is a trusted-keys file");
        assert_eq!(keys, vec![key.verifying_key()]);
        let build = dir.path().join("b.wasm");
        std::fs::write(&build, b"bytes").expect("write");
        let (sig, id) = try_sign(&private, &build).expect("sign");
        assert_eq!(sig, dir.path().join("b.wasm.sig"));
        assert_eq!(id, key_id(&key.verifying_key()));
        let parsed = GuestSignature::parse(&std::fs::read(&sig).expect("read")).expect("parse");
        assert!(key.verifying_key().verify_strict(b"bytes", &parsed.signature).is_ok());
    }
}
