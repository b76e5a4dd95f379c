//! qcow2 images through `qemu-img`: thin overlays on a backing image, growing them, and reading their virtual size
//! and backing chain. Output is read with `--output=json` only; human-readable text is never parsed. Runs
//! `qemu-img` with tokio::process, killed if the future is dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Image formats Quantix stores. Always passed to qemu-img and QEMU explicitly: probing a raw image that a guest
/// wrote could find a qcow2 header naming a host file as its backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img and QEMU's `driver=` use.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The file extension pools give images of this format.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    fn from_qemu(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One image as `qemu-img info --output=json` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: PathBuf,
    /// The format qemu-img was told or detected, e.g. "qcow2", "raw", "vmdk".
    pub format: String,
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// The backing file as recorded in the image (may be relative to the image's directory).
    pub backing_filename: Option<String>,
    /// The backing file resolved to a path.
    pub full_backing_filename: Option<PathBuf>,
    pub backing_format: Option<String>,
}

impl ImageInfo {
    /// The format as one Quantix stores, if it is one.
    pub fn image_format(&self) -> Option<ImageFormat> {
        ImageFormat::from_qemu(&self.format)
    }
}

#[derive(Deserialize)]
struct RawInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
}

impl From<RawInfo> for ImageInfo {
    fn from(r: RawInfo) -> Self {
        Self {
            filename: r.filename.into(),
            format: r.format,
            virtual_size: r.virtual_size,
            actual_size: r.actual_size,
            backing_filename: r.backing_filename,
            full_backing_filename: r.full_backing_filename.map(PathBuf::from),
            backing_format: r.backing_format,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    #[error("parse `{command}` JSON output")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{command}` printed no image")]
    EmptyChain { command: String },
}

/// The `qemu-img` program to run.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
}

impl Default for QemuImg {
    fn default() -> Self {
        Self { program: PathBuf::from("qemu-img") }
    }
}

impl QemuImg {
    /// `qemu-img` from `PATH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A specific binary, e.g. the one shipped beside the daemon's QEMU so both are the same version.
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into() }
    }

    async fn run(&self, args: Vec<OsString>) -> Result<Vec<u8>, Qcow2Error> {
        let command = self.describe(&args);
        tracing::debug!(%command, "qemu-img");
        let out = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| Qcow2Error::Spawn { program: self.program.clone(), source })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(Qcow2Error::Failed { command, status: out.status, stderr });
        }
        Ok(out.stdout)
    }

    fn describe(&self, args: &[OsString]) -> String {
        let mut s = self.program.display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// `qemu-img info` of one image. `format` skips probing; pass it whenever it is known. Uses `-U` (force share)
    /// so it works while a running VM holds the image's lock.
    pub async fn info(&self, path: &Path, format: Option<ImageFormat>) -> Result<ImageInfo, Qcow2Error> {
        let mut args: Vec<OsString> = vec!["info".into(), "--output=json".into(), "-U".into()];
        if let Some(f) = format {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.push(path.into());
        let command = self.describe(&args);
        let out = self.run(args).await?;
        let raw: RawInfo = serde_json::from_slice(&out).map_err(|source| Qcow2Error::Parse { command, source })?;
        Ok(raw.into())
    }

    /// The image and every image below it, top first (`qemu-img info --backing-chain`).
    pub async fn backing_chain(&self, path: &Path, format: Option<ImageFormat>) -> Result<Vec<ImageInfo>, Qcow2Error> {
        let mut args: Vec<OsString> =
            vec!["info".into(), "--output=json".into(), "-U".into(), "--backing-chain".into()];
        if let Some(f) = format {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.push(path.into());
        let command = self.describe(&args);
        let out = self.run(args).await?;
        let raw: Vec<RawInfo> =
            serde_json::from_slice(&out).map_err(|source| Qcow2Error::Parse { command: command.clone(), source })?;
        if raw.is_empty() {
            return Err(Qcow2Error::EmptyChain { command });
        }
        Ok(raw.into_iter().map(ImageInfo::from).collect())
    }

    /// Creates an empty qcow2 image of `size` bytes.
    pub async fn create(&self, path: &Path, size: u64) -> Result<(), Qcow2Error> {
        let args: Vec<OsString> =
            vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into(), path.into(), size.to_string().into()];
        self.run(args).await.map(drop)
    }

    /// Creates a qcow2 overlay at `path` on `backing` (recorded as given: pass an absolute path so the overlay can be
    /// opened from anywhere). Reads come from the backing image until written; the backing image is never
    /// modified. `size` defaults to the backing image's virtual size and must not be smaller.
    pub async fn create_overlay(
        &self,
        path: &Path,
        backing: &Path,
        backing_format: ImageFormat,
        size: Option<u64>,
    ) -> Result<(), Qcow2Error> {
        let mut args: Vec<OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            backing_format.as_str().into(),
            "-b".into(),
            backing.into(),
            path.into(),
        ];
        if let Some(size) = size {
            args.push(size.to_string().into());
        }
        self.run(args).await.map(drop)
    }

    /// Sets the virtual size of an image that no VM has open (a running VM's disk is resized with QMP
    /// `block_resize` instead). Shrinking needs `shrink`.
    pub async fn resize(&self, path: &Path, format: ImageFormat, size: u64, shrink: bool) -> Result<(), Qcow2Error> {
        let mut args: Vec<OsString> = vec!["resize".into(), "-q".into(), "-f".into(), format.as_str().into()];
        if shrink {
            args.push("--shrink".into());
        }
        args.extend([path.into(), size.to_string().into()]);
        self.run(args).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info_json() {
        let json = r#"{
            "virtual-size": 2147483648, "filename": "/p/vm.qcow2", "cluster-size": 65536, "format": "qcow2",
            "actual-size": 200704, "full-backing-filename": "/p/base.raw", "backing-filename": "/p/base.raw",
            "backing-filename-format": "raw", "dirty-flag": false
        }"#;
        let info: ImageInfo = serde_json::from_str::<RawInfo>(json).unwrap().into();
        assert_eq!(info.virtual_size, 2 << 30);
        assert_eq!(info.image_format(), Some(ImageFormat::Qcow2));
        assert_eq!(info.full_backing_filename.as_deref(), Some(Path::new("/p/base.raw")));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let q = QemuImg::with_program("/nonexistent/qemu-img");
        let err = rt.block_on(q.info(Path::new("/x"), None)).unwrap_err();
        assert!(matches!(err, Qcow2Error::Spawn { .. }));
        assert_eq!(err.to_string(), "run /nonexistent/qemu-img");
    }
}
