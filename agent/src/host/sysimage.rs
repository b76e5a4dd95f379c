//! The Quantix system image (`system.qxi`, made by `image/build.sh`): what UpdateHost installs. A 4096-byte text
//! header, then the payload, the ext4 filesystem of one system partition (kernel, initramfs, system.squashfs):
//!
//! ```text
//! QUANTIX-SYSTEM-IMAGE
//! format=1
//! version=0.1.0-42-gabcdef
//! payload_size=283115520
//! payload_sha256=<64 hex>
//! <NUL padding to 4096 bytes>
//! ```

/// Bytes before the payload.
pub const HEADER_SIZE: u64 = 4096;
const MAGIC: &str = "QUANTIX-SYSTEM-IMAGE";
/// The filesystem label `image/build.sh` gives every system partition.
pub const PAYLOAD_LABEL: &str = "quantix-system";

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: String,
    pub payload_size: u64,
    pub payload_sha256: String,
}

/// Why a file is not a Quantix system image; the message says what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Quantix system image: {0}")]
pub struct NotAnImage(pub String);

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes (fewer mean the file is too short to be an image).
    pub fn parse(block: &[u8]) -> Result<Self, NotAnImage> {
        let bad = |what: String| NotAnImage(what);
        if block.len() < HEADER_SIZE as usize {
            return Err(bad(format!("{} bytes, shorter than the {HEADER_SIZE}-byte header", block.len())));
        }
        let text_end = block[..HEADER_SIZE as usize].iter().position(|&b| b == 0).unwrap_or(HEADER_SIZE as usize);
        let text = std::str::from_utf8(&block[..text_end]).map_err(|_| bad("the header is not text".into()))?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(bad(format!("it does not start with {MAGIC}")));
        }
        let (mut format, mut version, mut size, mut sha) = (None, None, None, None);
        for line in lines {
            let Some((key, value)) = line.split_once('=') else { continue };
            match key {
                "format" => format = Some(value),
                "version" => version = Some(value),
                "payload_size" => size = Some(value),
                "payload_sha256" => sha = Some(value),
                _ => {}
            }
        }
        if format != Some("1") {
            return Err(bad(format!("header format {:?}, this qx-node reads format 1", format.unwrap_or(""))));
        }
        let version = version.filter(|v| is_version(v)).ok_or_else(|| bad("no valid version= in the header".into()))?;
        let payload_size = size
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .ok_or_else(|| bad("no valid payload_size= in the header".into()))?;
        let payload_sha256 = sha
            .filter(|s| is_sha256(s))
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| bad("no valid payload_sha256= in the header".into()))?;
        Ok(Self { version: version.to_owned(), payload_size, payload_sha256 })
    }

    /// Renders a header (for tests and tools; `image/build.sh` writes the same with printf).
    pub fn render(&self) -> Vec<u8> {
        let mut bytes = format!(
            "{MAGIC}\nformat=1\nversion={}\npayload_size={}\npayload_sha256={}\n",
            self.version, self.payload_size, self.payload_sha256
        )
        .into_bytes();
        bytes.resize(HEADER_SIZE as usize, 0);
        bytes
    }
}

/// Checks that `block`, the payload's first 2048 bytes, is an ext4 superblock labelled [`PAYLOAD_LABEL`] whose
/// filesystem is exactly `payload_size` bytes: the system partition the initramfs will mount.
pub fn check_payload(block: &[u8], payload_size: u64) -> Result<(), NotAnImage> {
    let bad = |what: String| NotAnImage(what);
    let sb = block.get(1024..2048).ok_or_else(|| bad("the payload is shorter than an ext4 superblock".into()))?;
    let le32 = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap_or_default());
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return Err(bad("the payload is not an ext4 filesystem".into()));
    }
    let label_bytes = &sb[0x78..0x88];
    let label = String::from_utf8_lossy(&label_bytes[..label_bytes.iter().position(|&b| b == 0).unwrap_or(16)]);
    if label != PAYLOAD_LABEL {
        return Err(bad(format!("the payload's filesystem is labelled {label:?}, not {PAYLOAD_LABEL:?}")));
    }
    let block_size = 1024u64 << le32(0x18).min(16);
    // The 64bit feature keeps the block count's high half at 0x150.
    let high = if le32(0x60) & 0x80 != 0 { u64::from(le32(0x150)) } else { 0 };
    let fs_size = ((high << 32) | u64::from(le32(0x04))) * block_size;
    if fs_size != payload_size {
        return Err(bad(format!("the payload's filesystem is {fs_size} bytes, the header says {payload_size}")));
    }
    Ok(())
}

/// A version as the header and GRUB's menu show it: 1..=64 of `[A-Za-z0-9._+-]`.
pub fn is_version(v: &str) -> bool {
    (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ext4 superblock (in a 2048-byte block) for a filesystem of `size` bytes labelled `label`.
    pub fn ext4_start(size: u64, label: &str) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        let sb = &mut b[1024..];
        sb[0x04..0x08].copy_from_slice(&((size / 4096) as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 1024 << 2
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x78..0x78 + label.len()].copy_from_slice(label.as_bytes());
        b
    }

    #[test]
    fn header_round_trips() {
        let header = Header { version: "1.2.3-4-gabc".into(), payload_size: 8192, payload_sha256: "ab".repeat(32) };
        assert_eq!(Header::parse(&header.render()).unwrap(), header);
    }

    #[test]
    fn refuses_other_files() {
        let short = Header::parse(b"QUANTIX-SYSTEM-IMAGE\n").unwrap_err();
        assert_eq!(short.to_string(), "not a Quantix system image: 21 bytes, shorter than the 4096-byte header");
        let mut other = vec![0u8; 4096];
        other[..4].copy_from_slice(b"\x7fELF");
        assert!(Header::parse(&other).unwrap_err().0.contains("does not start with QUANTIX-SYSTEM-IMAGE"));
        let mut future = Header { version: "1".into(), payload_size: 1, payload_sha256: "0".repeat(64) }.render();
        future[21..29].copy_from_slice(b"format=2");
        assert!(Header::parse(&future).unwrap_err().0.contains("header format \"2\""));
        let bad_version = Header { version: "a b".into(), payload_size: 1, payload_sha256: "0".repeat(64) };
        assert!(Header::parse(&bad_version.render()).unwrap_err().0.contains("version"));
    }

    #[test]
    fn payload_must_be_a_system_partition() {
        check_payload(&ext4_start(1 << 20, PAYLOAD_LABEL), 1 << 20).unwrap();
        let err = check_payload(&ext4_start(1 << 20, "rootfs"), 1 << 20).unwrap_err();
        assert!(err.0.contains("labelled \"rootfs\""), "{err}");
        let err = check_payload(&ext4_start(1 << 20, PAYLOAD_LABEL), 2 << 20).unwrap_err();
        assert!(err.0.contains("is 1048576 bytes, the header says 2097152"), "{err}");
        assert!(check_payload(&[0u8; 2048], 1).unwrap_err().0.contains("not an ext4"));
    }
}
