//! `qxctl pool`, `qxctl volume` and `qxctl image`: storage pools, their volumes and their image libraries.

use anyhow::{bail, Context};
use clap::Subcommand;
use futures::{Stream, StreamExt};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::progress::ProgressBar;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Pools with capacity and usage.
    List,
    Show {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    List {
        #[arg(long, default_value = "default")]
        pool: String,
    },
    Show {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// An empty volume, or one made from a library image (a thin overlay unless --copy).
    Create {
        name: String,
        /// Size in MiB; required for an empty volume, from an image it defaults to the image's size.
        #[arg(long)]
        size_mib: Option<u64>,
        /// For empty volumes: qcow2 (thin) or raw (sparse).
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// A library image to start from.
        #[arg(long)]
        image: Option<String>,
        /// A full, independent copy of the image instead of a thin overlay.
        #[arg(long, requires = "image")]
        copy: bool,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Grows a volume; the disk of a running or paused VM grows online.
    Resize {
        name: String,
        #[arg(long)]
        size_mib: u64,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// A full copy of a volume no running VM uses.
    Clone {
        name: String,
        new_name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Refused while a running VM uses the volume.
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    List {
        #[arg(long, default_value = "default")]
        pool: String,
    },
    Show {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Copies a file on the node into the library.
    Import {
        name: String,
        /// An absolute path on the node.
        path: std::path::PathBuf,
        /// iso, cloud-image or template.
        #[arg(long)]
        kind: String,
        /// raw or qcow2; probed when absent.
        #[arg(long)]
        format: Option<String>,
        /// The SHA-256 (hex) the file must have.
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Refused while a volume is an overlay on the image.
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
}

pub async fn pool(node: &mut NodeServiceClient<Channel>, command: PoolCommand, json: bool) -> anyhow::Result<()> {
    let pools = match command {
        PoolCommand::List => node.list_pools(pb::ListPoolsRequest {}).await?.into_inner().pools,
        PoolCommand::Show { name } => vec![node.get_pool(pb::PoolRef { name }).await?.into_inner()],
    };
    if json {
        let list: Vec<Value> = pools
            .iter()
            .map(|p| {
                json!({ "name": p.name, "kind": p.kind, "capacity_bytes": p.capacity_bytes,
                        "available_bytes": p.available_bytes, "allocated_bytes": p.allocated_bytes,
                        "volumes": p.volumes, "images": p.images, "copy_method": p.copy_method,
                        "copy_method_reason": p.copy_method_reason })
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!(
        "{:<12} {:<5} {:>10} {:>10} {:>10} {:>8} {:>7}",
        "NAME", "KIND", "CAPACITY", "FREE", "ALLOCATED", "VOLUMES", "IMAGES"
    );
    for p in &pools {
        println!(
            "{:<12} {:<5} {:>10} {:>10} {:>10} {:>8} {:>7}",
            p.name,
            p.kind,
            size(p.capacity_bytes),
            size(p.available_bytes),
            size(p.allocated_bytes),
            p.volumes,
            p.images
        );
    }
    for p in &pools {
        println!("{} copies by {}: {}", p.name, p.copy_method, p.copy_method_reason);
    }
    Ok(())
}

pub async fn volume(node: &mut NodeServiceClient<Channel>, command: VolumeCommand, json: bool) -> anyhow::Result<()> {
    let volumes = match command {
        VolumeCommand::List { pool } => node.list_volumes(pb::ListVolumesRequest { pool }).await?.into_inner().volumes,
        VolumeCommand::Show { name, pool } => vec![node.get_volume(pb::VolumeRef { pool, name }).await?.into_inner()],
        VolumeCommand::Create { name, size_mib, format, image, copy, pool } => {
            let format = match format.as_str() {
                "qcow2" => pb::DiskFormat::Qcow2,
                "raw" => pb::DiskFormat::Raw,
                other => bail!("--format: {other:?} is not qcow2 or raw"),
            } as i32;
            if image.is_none() && size_mib.is_none() {
                bail!("--size-mib is required for an empty volume (or give --image)");
            }
            let from_image = if copy { pb::FromImage::Copy } else { pb::FromImage::Overlay } as i32;
            let label = format!("creating {name}");
            let request = pb::CreateVolumeRequest {
                pool,
                name,
                size_bytes: size_mib.unwrap_or(0) << 20,
                format,
                image: image.unwrap_or_default(),
                from_image,
            };
            vec![volume_operation(node.create_volume(request).await?.into_inner(), &label, json).await?]
        }
        VolumeCommand::Resize { name, size_mib, pool } => {
            let request = pb::ResizeVolumeRequest { pool, name, size_bytes: size_mib << 20 };
            vec![node.resize_volume(request).await?.into_inner()]
        }
        VolumeCommand::Clone { name, new_name, pool } => {
            let label = format!("cloning {name} to {new_name}");
            let stream = node.clone_volume(pb::CloneVolumeRequest { pool, name, new_name }).await?.into_inner();
            vec![volume_operation(stream, &label, json).await?]
        }
        VolumeCommand::Delete { name, pool } => {
            node.delete_volume(pb::VolumeRef { pool, name: name.clone() }).await?;
            println!("deleted {name}");
            return Ok(());
        }
    };
    let format = |v: &pb::Volume| if v.format == pb::DiskFormat::Raw as i32 { "raw" } else { "qcow2" };
    if json {
        let list: Vec<Value> = volumes
            .iter()
            .map(|v| {
                json!({ "pool": v.pool, "name": v.name, "format": format(v), "capacity_bytes": v.capacity_bytes,
                        "allocated_bytes": v.allocated_bytes, "origin": v.origin, "origin_name": v.origin_name,
                        "backing_image": v.backing_image })
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!("{:<12} {:<24} {:<6} {:>10} {:>10}  ORIGIN", "POOL", "NAME", "FORMAT", "SIZE", "ALLOCATED");
    for v in &volumes {
        let origin =
            if v.origin_name.is_empty() { v.origin.clone() } else { format!("{} {}", v.origin, v.origin_name) };
        let (capacity, allocated) = (size(v.capacity_bytes), size(v.allocated_bytes));
        println!("{:<12} {:<24} {:<6} {capacity:>10} {allocated:>10}  {origin}", v.pool, v.name, format(v));
    }
    Ok(())
}

pub async fn image(node: &mut NodeServiceClient<Channel>, command: ImageCommand, json: bool) -> anyhow::Result<()> {
    let images = match command {
        ImageCommand::List { pool } => node.list_images(pb::ListImagesRequest { pool }).await?.into_inner().images,
        ImageCommand::Show { name, pool } => vec![node.get_image(pb::ImageRef { pool, name }).await?.into_inner()],
        ImageCommand::Import { name, path, kind, format, sha256, pool } => {
            let kind = match kind.as_str() {
                "iso" => pb::ImageKind::Iso,
                "cloud-image" => pb::ImageKind::CloudImage,
                "template" => pb::ImageKind::Template,
                other => bail!("--kind: {other:?} is not iso, cloud-image or template"),
            } as i32;
            let format = match format.as_deref() {
                None => pb::DiskFormat::Unspecified,
                Some("raw") => pb::DiskFormat::Raw,
                Some("qcow2") => pb::DiskFormat::Qcow2,
                Some(other) => bail!("--format: {other:?} is not raw or qcow2"),
            } as i32;
            // The node reads the file, so a relative path means the caller's directory, not the daemon's.
            let path = std::path::absolute(&path).with_context(|| format!("{}", path.display()))?;
            let request = pb::ImportImageRequest {
                pool,
                name: name.clone(),
                kind,
                source_path: path.display().to_string(),
                format,
                size_bytes: None,
                sha256: sha256.unwrap_or_default(),
            };
            let mut stream = node.import_image(request).await?.into_inner();
            let mut bar = ProgressBar::new(format!("importing {name}"), json);
            let image = loop {
                match stream.message().await?.and_then(|op| op.event) {
                    Some(pb::image_operation::Event::Progress(p)) => bar.update(p.done_bytes, p.total_bytes),
                    Some(pb::image_operation::Event::Image(image)) => break image,
                    None => bail!("qx-node ended the import without a result"),
                }
            };
            bar.finish();
            vec![image]
        }
        ImageCommand::Delete { name, pool } => {
            node.delete_image(pb::ImageRef { pool, name: name.clone() }).await?;
            println!("deleted {name}");
            return Ok(());
        }
    };
    let kind = |i: &pb::Image| match pb::ImageKind::try_from(i.kind) {
        Ok(pb::ImageKind::Iso) => "iso",
        Ok(pb::ImageKind::CloudImage) => "cloud-image",
        Ok(pb::ImageKind::Template) => "template",
        _ => "?",
    };
    let format = |i: &pb::Image| if i.format == pb::DiskFormat::Raw as i32 { "raw" } else { "qcow2" };
    if json {
        let list: Vec<Value> = images
            .iter()
            .map(|i| {
                json!({ "pool": i.pool, "name": i.name, "kind": kind(i), "format": format(i),
                        "virtual_size_bytes": i.virtual_size_bytes, "file_size_bytes": i.file_size_bytes,
                        "sha256": i.sha256 })
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!("{:<12} {:<24} {:<12} {:<6} {:>10} {:>10}", "POOL", "NAME", "KIND", "FORMAT", "SIZE", "FILE");
    for i in &images {
        let (virtual_size, file_size) = (size(i.virtual_size_bytes), size(i.file_size_bytes));
        println!("{:<12} {:<24} {:<12} {:<6} {virtual_size:>10} {file_size:>10}", i.pool, i.name, kind(i), format(i));
    }
    Ok(())
}

/// Follows a volume operation's stream to its end, drawing its progress.
async fn volume_operation(
    mut stream: impl Stream<Item = Result<pb::VolumeOperation, tonic::Status>> + Unpin,
    label: &str,
    json: bool,
) -> anyhow::Result<pb::Volume> {
    let mut bar = ProgressBar::new(label, json);
    while let Some(op) = stream.next().await {
        match op?.event {
            Some(pb::volume_operation::Event::Progress(p)) => bar.update(p.done_bytes, p.total_bytes),
            Some(pb::volume_operation::Event::Volume(volume)) => return Ok(volume),
            None => {}
        }
    }
    bail!("qx-node ended the operation without a result")
}

/// Bytes in the largest binary unit that keeps a whole number in front.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 40 => format!("{:.1}Ti", b as f64 / (1u64 << 40) as f64),
        b if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{}Mi", b >> 20),
        b => format!("{}Ki", b.div_ceil(1 << 10)),
    }
}
