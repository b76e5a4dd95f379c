//! GRUB's environment block: the 1024-byte file GRUB's `load_env` reads and `save_env` rewrites in place. The host
//! image keeps its A/B boot state there (`image/grub/grub.cfg` says what each variable means), on the EFI
//! partition: FAT has no journal, so what qx-node synced is what GRUB reads after any reset.

use std::collections::BTreeMap;
use std::path::Path;

/// GRUB's block size; `grub-editenv` and `save_env` keep the file at exactly this.
pub const BLOCK_SIZE: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a GRUB environment block: {problem}")]
    Format { path: String, problem: String },
    #[error("the GRUB environment would be {size} bytes, more than GRUB's {BLOCK_SIZE}")]
    TooLarge { size: usize },
    #[error("{name}={value:?} cannot be stored in a GRUB environment block (newline or NUL)")]
    BadValue { name: String, value: String },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The variables of one environment block, in name order (GRUB keeps no order that matters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv(BTreeMap<String, String>);

impl GrubEnv {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, GrubEnvError> {
        let format = |problem: &str| GrubEnvError::Format { path: path.display().to_string(), problem: problem.into() };
        let text = std::str::from_utf8(bytes).map_err(|_| format("not UTF-8"))?;
        let body = text.strip_prefix(HEADER).ok_or_else(|| format("no '# GRUB Environment Block' header"))?;
        let mut vars = BTreeMap::new();
        for line in body.lines() {
            // The padding is '#' characters on the last line; comments are ignored as GRUB does.
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or_else(|| format(&format!("line {line:?} has no '='")))?;
            vars.insert(name.to_owned(), value.to_owned());
        }
        Ok(Self(vars))
    }

    pub fn read(path: &Path) -> Result<Self, GrubEnvError> {
        let bytes =
            std::fs::read(path).map_err(|source| GrubEnvError::Read { path: path.display().to_string(), source })?;
        Self::parse(path, &bytes)
    }

    /// The block as GRUB writes it: header, `name=value` lines, '#' padding to [`BLOCK_SIZE`].
    pub fn render(&self) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = String::from(HEADER);
        for (name, value) in &self.0 {
            if value.contains(['\n', '\0']) || name.contains(['\n', '\0', '=']) {
                return Err(GrubEnvError::BadValue { name: name.clone(), value: value.clone() });
            }
            out.push_str(name);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        }
        if out.len() > BLOCK_SIZE {
            return Err(GrubEnvError::TooLarge { size: out.len() });
        }
        let mut bytes = out.into_bytes();
        bytes.resize(BLOCK_SIZE, b'#');
        Ok(bytes)
    }

    /// Writes the block atomically (temp file, fsync, rename, fsync the directory).
    pub fn write(&self, path: &Path) -> Result<(), GrubEnvError> {
        let bytes = self.render()?;
        qx_vmm::persist::write_atomic(path, &bytes)
            .map_err(|source| GrubEnvError::Write { path: path.display().to_string(), source })
    }

    /// The value of `name`; unset and empty are the same to GRUB's `[ -n ... ]`.
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.0.insert(name.to_owned(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_grub_editenv_writes() {
        // `grub-editenv f create; grub-editenv f set qx_default=a qx_pending=` writes this, padded with '#'.
        let mut grub = b"# GRUB Environment Block\nqx_default=a\nqx_pending=\n".to_vec();
        grub.resize(BLOCK_SIZE, b'#');
        let env = GrubEnv::parse(Path::new("grubenv"), &grub).unwrap();
        assert_eq!(env.get("qx_default"), "a");
        assert_eq!(env.get("qx_pending"), "");
        assert_eq!(env.get("unset"), "");
        assert_eq!(env.render().unwrap(), grub);
    }

    #[test]
    fn refuses_what_grub_would_not_read() {
        let err = GrubEnv::parse(Path::new("/x"), b"qx_default=a\n").unwrap_err();
        assert_eq!(err.to_string(), "/x is not a GRUB environment block: no '# GRUB Environment Block' header");
        let mut env = GrubEnv::default();
        env.set("v", "two\nlines");
        assert!(matches!(env.render(), Err(GrubEnvError::BadValue { .. })));
        let mut env = GrubEnv::default();
        env.set("v", "x".repeat(BLOCK_SIZE));
        assert!(matches!(env.render(), Err(GrubEnvError::TooLarge { .. })));
    }

    #[test]
    fn writes_exactly_one_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let mut env = GrubEnv::default();
        env.set("qx_trying", "b");
        env.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), BLOCK_SIZE as u64);
        assert_eq!(GrubEnv::read(&path).unwrap(), env);
    }
}
