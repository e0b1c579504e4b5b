//! The text formats of guest-build signing, shared by `waxos sign`/`waxos keygen` (which write
//! them) and `waxosd` (which reads them and decides, in `waxos_host::signing`, what to trust).
//!
//! A signature is *detached*: `<build>.wasm.sig` next to the build, over exactly the bytes of
//! the `.wasm` file. An embedded custom section would mean signing "the component minus one
//! section": the verifier would have to parse untrusted wasm to find and cut the section before
//! it knows whether to trust the bytes, and the bytes that run would differ from the bytes that
//! were signed. Detached, the host checks the signature before it parses anything, and the
//! hash `status` shows is the hash of the signed bytes.
//!
//! Formats (text, one item per line, `\n` or `\r\n`):
//! - signature file: `waxos-guest-signature v1`, then `key <key id>`, then
//!   `ed25519 <128 hex digits>`;
//! - private key file: `waxos-signing-key v1`, then the 32-byte ed25519 seed in 64 hex digits
//!   (written with mode 0600);
//! - public key / trusted-keys file: one public key per line in 64 hex digits; `#` starts a
//!   comment; blank lines are ignored.
//!
//! A key id is the first 16 hex digits of the public key itself (not of a hash of it): an
//! operator finds the key a log line names with `grep ID trusted-keys`. The id only picks the
//! key; the signature is checked against the whole key.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// First line of a signature file.
pub const SIGNATURE_HEADER: &str = "waxos-guest-signature v1";
/// First line of a private key file.
pub const PRIVATE_KEY_HEADER: &str = "waxos-signing-key v1";
/// Largest signature file anyone should send or read (a real one is about 180 bytes).
pub const SIGNATURE_FILE_BYTES_MAX: usize = 4096;
/// Length of a key id in hex digits.
pub const KEY_ID_HEX_DIGITS: usize = 16;

/// A signature file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormatError {}

fn err<T>(text: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(text.into()))
}

/// The path of the detached signature of the build at `build`: `build` with `.sig` appended.
pub fn signature_path(build: &std::path::Path) -> std::path::PathBuf {
    let mut name = build.as_os_str().to_os_string();
    name.push(".sig");
    std::path::PathBuf::from(name)
}

/// A key's id: the first 16 hex digits of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(key.as_bytes())[..KEY_ID_HEX_DIGITS].to_string()
}

/// A parsed signature file: which key signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSignature {
    /// The signer's key id (16 lower-case hex digits).
    pub key_id: String,
    /// The ed25519 signature over the build's bytes.
    pub signature: Signature,
}

impl GuestSignature {
    /// Signs `build` (the exact bytes of the `.wasm` file) with `key`.
    pub fn sign(key: &SigningKey, build: &[u8]) -> GuestSignature {
        GuestSignature { key_id: key_id(&key.verifying_key()), signature: key.sign(build) }
    }

    /// The signature file's text.
    pub fn to_text(&self) -> String {
        format!("{SIGNATURE_HEADER}\nkey {}\ned25519 {}\n", self.key_id, hex(&self.signature.to_bytes()))
    }

    /// Reads a signature file. Strict: the header, then exactly the two lines, nothing else.
    pub fn parse(file: &[u8]) -> Result<GuestSignature, FormatError> {
        if file.len() > SIGNATURE_FILE_BYTES_MAX {
            return err(format!("{} bytes, more than a signature file can be", file.len()));
        }
        let Ok(text) = std::str::from_utf8(file) else {
            return err("not text");
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some(SIGNATURE_HEADER) => {}
            Some(other) if other.starts_with("waxos-guest-signature") => {
                return err(format!("unsupported signature format {:?} (this host reads {SIGNATURE_HEADER:?})", other))
            }
            _ => return err(format!("not a waxos guest signature (the first line must be {SIGNATURE_HEADER:?})")),
        }
        let key_id = match lines.next().and_then(|l| l.strip_prefix("key ")) {
            Some(id) if id.len() == KEY_ID_HEX_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                id.to_ascii_lowercase()
            }
            _ => return err(format!("the second line must be `key <{KEY_ID_HEX_DIGITS} hex digits>`")),
        };
        let signature = match lines.next().and_then(|l| l.strip_prefix("ed25519 ")).and_then(unhex::<64>) {
            Some(bytes) => Signature::from_bytes(&bytes),
            None => return err("the third line must be `ed25519 <128 hex digits>`"),
        };
        if lines.next().is_some() {
            return err("unexpected text after the signature");
        }
        Ok(GuestSignature { key_id, signature })
    }
}

/// A private key file's text.
pub fn private_key_text(key: &SigningKey) -> String {
    format!("{PRIVATE_KEY_HEADER}\n{}\n", hex(key.as_bytes()))
}

/// Reads a private key file.
pub fn parse_private_key(file: &str) -> Result<SigningKey, FormatError> {
    let mut lines = file.lines().map(str::trim).filter(|l| !l.is_empty());
    if lines.next() != Some(PRIVATE_KEY_HEADER) {
        return err(format!("not a waxos signing key (the first line must be {PRIVATE_KEY_HEADER:?})"));
    }
    let Some(seed) = lines.next().and_then(unhex::<32>) else {
        return err("the second line must be the key's 64 hex digits");
    };
    if lines.next().is_some() {
        return err("unexpected text after the key");
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// A public key in its one-line form (64 hex digits).
pub fn public_key_text(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// Reads the public keys of a trusted-keys (or public key) file: one per line, `#` comments.
/// The error names the line.
pub fn parse_public_keys(file: &str) -> Result<Vec<VerifyingKey>, FormatError> {
    let mut keys = Vec::new();
    for (n, line) in file.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some(bytes) = unhex::<32>(line) else {
            return err(format!("line {}: not an ed25519 public key in 64 hex digits", n + 1));
        };
        match VerifyingKey::from_bytes(&bytes) {
            Ok(key) => keys.push(key),
            Err(_) => return err(format!("line {}: not a valid ed25519 public key", n + 1)),
        }
    }
    Ok(keys)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Exactly `N` bytes from `2N` hex digits (either case), or `None`.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = (value(pair[0])? << 4) | value(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signature_file_round_trips_and_is_read_strictly() {
        let signature = GuestSignature::sign(&key(7), b"build bytes");
        let text = signature.to_text();
        assert!(text.starts_with("waxos-guest-signature v1\nkey "), "{text}");
        assert_eq!(GuestSignature::parse(text.as_bytes()), Ok(signature.clone()));
        assert_eq!(GuestSignature::parse(text.replace('\n', "\r\n").as_bytes()), Ok(signature));
        for bad in [
            String::new(),
            text.replace("v1", "v2"),
            text.replacen("key ", "kee ", 1),
            text.replacen("ed25519 ", "ed25519 0", 1),
            format!("{text}extra\n"),
            text.lines().take(2).collect::<Vec<_>>().join("\n"),
        ] {
            assert!(GuestSignature::parse(bad.as_bytes()).is_err(), "accepted: {bad:?}");
        }
        assert!(GuestSignature::parse(&[0xff; 10]).is_err());
        assert!(GuestSignature::parse(&vec![b'a'; SIGNATURE_FILE_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn key_files_round_trip() {
        let k = key(9);
        assert_eq!(parse_private_key(&private_key_text(&k)).map(|p| p.to_bytes()), Ok(k.to_bytes()));
        let public = format!("# a comment\n\n{}  # trailing\n", public_key_text(&k.verifying_key()));
        assert_eq!(parse_public_keys(&public), Ok(vec![k.verifying_key()]));
        assert!(parse_public_keys("abc\n").is_err_and(|e| e.0.contains("line 1")));
        assert_eq!(key_id(&k.verifying_key()).len(), KEY_ID_HEX_DIGITS);
        assert!(public_key_text(&k.verifying_key()).starts_with(&key_id(&k.verifying_key())));
    }

    #[test]
    fn signature_path_appends_sig() {
        assert_eq!(signature_path(std::path::Path::new("a/b.wasm")), std::path::PathBuf::from("a/b.wasm.sig"));
    }
}
