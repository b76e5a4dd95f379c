//! Volumes and library images as pools store them, the requests that create them, and the "in use" check callers
//! supply so that a pool never deletes or resizes a disk under a running VM.

use serde::{Deserialize, Serialize};

use crate::engine::{Digest, Preallocation};
use crate::qcow2::ImageFormat;
use crate::validate::{check_name, Invalid, Problems};

/// A VM disk in a pool. VMs name it as `pool/volume`; the pool turns that into a [`crate::DiskSource`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub format: ImageFormat,
    /// Size the guest sees, in bytes.
    pub capacity: u64,
    pub origin: VolumeOrigin,
    /// The library image this volume reads through to (qcow2 overlays and their clones); the image cannot be
    /// deleted while any volume names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// Bytes allocated on the host; filled in when the volume is listed, not stored.
    #[serde(skip)]
    pub allocated: u64,
}

/// How a volume came to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VolumeOrigin {
    Empty,
    /// A thin qcow2 overlay on a library image.
    Overlay {
        image: String,
    },
    /// A full, independent copy of a library image.
    Copy {
        image: String,
    },
    /// A full copy of another volume.
    Clone {
        volume: String,
    },
}

/// What kind of file a library image is, which decides how a VM uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// An installer or tools ISO: attached read-only as a CD-ROM, never the base of a volume.
    Iso,
    /// A cloud image (Debian genericcloud, Ubuntu cloud images), configured at first boot by cloud-init.
    CloudImage,
    /// A prepared disk to clone VMs from.
    Template,
}

/// A file in a pool's image library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub kind: ImageKind,
    pub format: ImageFormat,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Size of the file.
    pub file_size: u64,
    /// The checksum verified at import, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    pub created_unix: u64,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum VolumeSource {
    /// A blank disk.
    Empty {
        size: u64,
        format: ImageFormat,
        /// Raw volumes only.
        #[serde(default)]
        preallocation: Preallocation,
    },
    /// A library image, as a thin overlay or a full copy.
    Image {
        image: String,
        mode: FromImage,
        /// The new volume's size; defaults to the image's virtual size and must not be smaller.
        #[serde(default)]
        size: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromImage {
    /// A qcow2 overlay backed by the image: instant and thin; the image must stay in the library.
    Overlay,
    /// A full copy (sparse-aware) in the image's format: independent of the image afterwards.
    Copy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub source: VolumeSource,
}

/// The smallest volume a pool creates: one sector.
pub const MIN_VOLUME_SIZE: u64 = 512;

impl CreateVolume {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut p = Problems::default();
        check_name(&mut p, "name", &self.name);
        match &self.source {
            VolumeSource::Empty { size, format, preallocation } => {
                check_size(&mut p, "source.size", *size);
                if *format == ImageFormat::Qcow2 && *preallocation != Preallocation::Off {
                    p.add(
                        "source.preallocation",
                        format!("{preallocation:?}").to_lowercase(),
                        "is only supported for raw volumes",
                    );
                }
            }
            VolumeSource::Image { image, size, .. } => {
                check_name(&mut p, "source.image", image);
                if let Some(size) = size {
                    check_size(&mut p, "source.size", *size);
                }
            }
        }
        p.into_result()
    }
}

pub(crate) fn check_size(p: &mut Problems, field: &str, size: u64) {
    if size < MIN_VOLUME_SIZE {
        p.add(field, size, format!("is below the minimum {MIN_VOLUME_SIZE}"));
    } else if size % 512 != 0 {
        p.add(field, size, "is not a multiple of 512");
    }
}

/// A request to add a file to a pool's image library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    pub name: String,
    pub kind: ImageKind,
    /// A local file (already downloaded); it is copied, not moved.
    pub source: std::path::PathBuf,
    /// The format; probed with qemu-img when absent (ISOs are always raw).
    #[serde(default)]
    pub format: Option<ImageFormat>,
    /// The exact size the source must have.
    #[serde(default)]
    pub size: Option<u64>,
    /// The SHA-256 the source must have.
    #[serde(default)]
    pub sha256: Option<Digest>,
}

impl ImportImage {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut p = Problems::default();
        check_name(&mut p, "name", &self.name);
        if !self.source.is_absolute() {
            p.add("source", self.source.display(), "is not an absolute path");
        }
        if self.kind == ImageKind::Iso && self.format == Some(ImageFormat::Qcow2) {
            p.add("format", ImageFormat::Qcow2, "is not possible for an ISO");
        }
        p.into_result()
    }
}

/// What a pool object is, for [`InUse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Volume,
    Image,
}

/// Tells a pool which running VMs use a volume or image. The VM manager implements it (or passes a closure); a
/// pool asks it before deleting, resizing or cloning a volume and before deleting an image, and refuses when the
/// answer is not empty.
pub trait InUse: Send + Sync {
    /// Names of the running VMs that use `name` in pool `pool`.
    fn users(&self, pool: &str, kind: ObjectKind, name: &str) -> Vec<String>;
}

impl<F> InUse for F
where
    F: Fn(&str, ObjectKind, &str) -> Vec<String> + Send + Sync,
{
    fn users(&self, pool: &str, kind: ObjectKind, name: &str) -> Vec<String> {
        self(pool, kind, name)
    }
}

/// For callers that know nothing runs (tools, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NotInUse;

impl InUse for NotInUse {
    fn users(&self, _: &str, _: ObjectKind, _: &str) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_volume_validation_reports_every_field() {
        let req = CreateVolume {
            name: "../x".into(),
            source: VolumeSource::Empty { size: 1000, format: ImageFormat::Qcow2, preallocation: Preallocation::Full },
        };
        let err = req.validate().unwrap_err().to_string();
        assert!(err.contains(r#"name: "../x" contains '/'"#), "{err}");
        assert!(err.contains(r#"name: "../x" contains '..'"#), "{err}");
        assert!(err.contains("source.size: \"1000\" is not a multiple of 512"), "{err}");
        assert!(err.contains("source.preallocation: \"full\" is only supported for raw volumes"), "{err}");
    }

    #[test]
    fn create_volume_parses_from_json() {
        let req: CreateVolume = serde_json::from_str(
            r#"{"name": "web-1", "source": {"kind": "image", "image": "debian-12", "mode": "overlay"}}"#,
        )
        .unwrap();
        req.validate().unwrap();
        assert_eq!(req.source, VolumeSource::Image { image: "debian-12".into(), mode: FromImage::Overlay, size: None });
    }

    #[test]
    fn closures_are_in_use_checks() {
        let check = |_: &str, kind: ObjectKind, name: &str| {
            if kind == ObjectKind::Volume && name == "busy" {
                vec!["vm1".to_owned()]
            } else {
                vec![]
            }
        };
        assert_eq!(check.users("default", ObjectKind::Volume, "busy"), vec!["vm1"]);
        assert!(check.users("default", ObjectKind::Image, "busy").is_empty());
        assert!(NotInUse.users("p", ObjectKind::Volume, "v").is_empty());
    }

    #[test]
    fn import_needs_absolute_source() {
        let req = ImportImage {
            name: "d".into(),
            kind: ImageKind::Iso,
            source: "rel.iso".into(),
            format: Some(ImageFormat::Qcow2),
            size: None,
            sha256: None,
        };
        let err = req.validate().unwrap_err().to_string();
        assert!(err.contains(r#"source: "rel.iso" is not an absolute path"#), "{err}");
        assert!(err.contains("format: \"qcow2\" is not possible for an ISO"), "{err}");
    }
}
