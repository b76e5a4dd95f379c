//! Copy benchmark: the engine against `cp`, `cp --sparse=always` and `qemu-img convert -O raw`, and against the
//! machine's limit, on three 2 GiB raw images:
//! - `half`: alternating 64 MiB extents of pseudo-random data and 64 MiB holes (1 GiB of data);
//! - `full`: 2 GiB of data, no holes;
//! - `small`: 4 KiB of data at the start of every MiB (2048 extents, 8 MiB of data: per-extent costs show).
//!
//! The limit is measured in the same run: the time to read the source's data extents with O_DIRECT (4 MiB
//! `pread`s, like `dd iflag=direct bs=4M`) plus the time to write them with O_DIRECT and fsync (like
//! `dd oflag=direct conv=fsync`). A disk that served reads and writes at once would bound a copy by the larger of
//! the two instead; that bound is printed too. Every copy is made
//! durable (fsync of file and directory; the engine does it itself, the tools get it after they exit) and checked
//! (same SHA-256 as the source). The engine runs with the plan its calibration picks in the benchmark's directory,
//! printed first. Each round runs every method once, in an order rotated from round to round; medians are reported,
//! with the spread of the per-round ratios.
//!
//! The page cache is dropped before each copy when /proc/sys/vm/drop_caches is writable (root). Otherwise every
//! method copies from a warm cache, and the engine reads buffered (an O_DIRECT read would go to the disk while the
//! tools read from memory); the limit is then not measured.
//!
//! `cargo bench -p qx-storage --bench copy` runs it (a few minutes). Environment:
//! - `QX_BENCH_DIR`: where the images go (default: cargo's target tmpdir); needs 6 GiB free.
//! - `QX_BENCH_ROUNDS`: rounds (default 5).
//! - `QX_BENCH_SHAPES`: which images, e.g. `half,small` (default `half,full,small`).
//! - `QX_BENCH_CLONE_DIR`: a directory on a reflink filesystem (XFS, btrfs): also time a full copy there.
//! - `QX_BENCH_PLANS`: instead of the calibrated plan, time these engine plans side by side (how the calibration's
//!   candidates were chosen): `copy_file_range` or `MODE:BLOCK_KIB:QUEUE_DEPTH` with MODE `direct` or `buffered`,
//!   comma-separated, e.g. `copy_file_range,direct:1024:4,direct:4096:2`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qx_storage::{CopyOptions, CopyPlan, DataMethod, Engine, EngineConfig, OpControl, UringTuning};

const SIZE: u64 = 2 << 30;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    what: &'static str,
    /// Every `period` bytes, `data` bytes of data at the start.
    period: u64,
    data: u64,
}

const SHAPES: [Shape; 3] = [
    Shape { name: "half", what: "64 MiB data / 64 MiB hole", period: 128 * MIB, data: 64 * MIB },
    Shape { name: "full", what: "fully allocated", period: SIZE, data: SIZE },
    Shape { name: "small", what: "4 KiB of data every 1 MiB", period: MIB, data: 4096 },
];

const TOOLS: [&str; 5] = ["cp", "cp --sparse=always", "qemu-img convert", "limit: read", "limit: write"];

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a filter argument from `cargo bench -- <filter>` is ignored.
    let dir = std::env::var_os("QX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qx-copy-bench"));
    fs::create_dir_all(&dir)?;
    let rounds: usize = std::env::var("QX_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let wanted = std::env::var("QX_BENCH_SHAPES").unwrap_or_else(|_| "half,full,small".to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;

    let cold = drop_caches();
    println!(
        "page cache: {}",
        if cold { "dropped before every copy (cold)" } else { "could not drop (not root?): warm for every method" }
    );
    let engine = Engine::new(EngineConfig::default())?;
    let t = Instant::now();
    let calibration = rt.block_on(engine.calibrate(&dir, &OpControl::new()))?;
    let mut plan = calibration.plan.clone();
    println!("calibration ({:.1?}): {}\n  {}", t.elapsed(), plan.summary(), plan.reason);
    if !cold {
        plan.uring.direct = false;
        println!("  warm cache: the engine reads buffered, as the tools do");
    }

    let mut plans = vec![("engine".to_owned(), plan)];
    if let Ok(list) = std::env::var("QX_BENCH_PLANS") {
        plans = list
            .split(',')
            .map(|item| Ok((format!("engine {item}"), parse_plan(item)?)))
            .collect::<anyhow::Result<_>>()?;
        if !cold {
            // Warm: no plan may read around the cache the tools read from.
            for (name, plan) in plans.iter_mut().filter(|(_, p)| p.uring.direct) {
                plan.uring.direct = false;
                println!("  warm cache: {name} reads buffered, as the tools do");
            }
        }
    }
    for shape in SHAPES.iter().filter(|s| wanted.split(',').any(|w| w == s.name)) {
        bench_shape(&rt, &engine, &plans, &dir, *shape, rounds, cold)?;
    }
    if let Some(clone_dir) = std::env::var_os("QX_BENCH_CLONE_DIR") {
        bench_clone(&rt, &engine, Path::new(&clone_dir), rounds)?;
    }
    Ok(())
}

fn parse_plan(item: &str) -> anyhow::Result<CopyPlan> {
    let mut plan = EngineConfig::default().configured_plan();
    plan.reflink = false;
    if item == "copy_file_range" {
        plan.data = DataMethod::CopyFileRange;
        return Ok(plan);
    }
    let parts: Vec<&str> = item.split(':').collect();
    anyhow::ensure!(parts.len() == 3, "bad plan {item:?}: copy_file_range or MODE:BLOCK_KIB:QUEUE_DEPTH");
    plan.data = DataMethod::Uring;
    plan.uring = UringTuning {
        direct: parts[0] == "direct",
        block_size: parts[1].parse::<usize>()? << 10,
        queue_depth: parts[2].parse()?,
    };
    Ok(plan)
}

fn bench_shape(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    plans: &[(String, CopyPlan)],
    dir: &Path,
    shape: Shape,
    rounds: usize,
    cold: bool,
) -> anyhow::Result<()> {
    let src = dir.join(format!("src-{}.raw", shape.name));
    let t = Instant::now();
    make_source(&src, shape)?;
    let extents = data_extents(&src)?;
    let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
    println!(
        "\n== {} ({}): 2 GiB, {} MiB of data in {} extents (source ready in {:.1?})",
        shape.name,
        shape.what,
        data >> 20,
        extents.len(),
        t.elapsed()
    );
    let want = sha256sum(&src)?;
    let dst = dir.join("dst.raw");
    let engines = plans.len();
    let methods: Vec<&str> = plans
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(TOOLS.iter().copied().filter(|m| cold || !m.starts_with("limit")))
        .collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    let mut mechanism = vec![String::new(); engines];
    for round in 0..rounds {
        for k in 0..methods.len() {
            let i = (k + round) % methods.len();
            let method = methods[i];
            remove(&dst)?;
            prepare_cache(&src, cold)?;
            let t = Instant::now();
            match method {
                _ if i < engines => {
                    let opts = CopyOptions { plan: Some(plans[i].1.clone()), ..CopyOptions::default() };
                    let report = rt.block_on(engine.copy(&src, &dst, opts, &OpControl::new()))?;
                    mechanism[i] = report.mechanism.to_string();
                }
                "cp" => tool(Command::new("cp").arg(&src).arg(&dst), &dst)?,
                "cp --sparse=always" => tool(Command::new("cp").arg("--sparse=always").arg(&src).arg(&dst), &dst)?,
                "qemu-img convert" => tool(
                    Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&src).arg(&dst),
                    &dst,
                )?,
                "limit: read" => read_direct(&src, &extents)?,
                _ => write_direct(&dst, &extents)?,
            }
            let elapsed = t.elapsed();
            samples[i].push(elapsed);
            if round == 0 && !method.starts_with("limit") {
                anyhow::ensure!(sha256sum(&dst)? == want, "{method}: the copy differs from the source");
                println!(
                    "  {method:<20} {elapsed:>9.2?}, {:>5} MiB allocated, content verified",
                    allocated(&dst)? >> 20
                );
            }
        }
    }
    remove(&dst)?;

    println!("results, median of {rounds} (min-max):");
    let position = |name: &str| methods.iter().position(|m| *m == name);
    for (i, (name, s)) in methods.iter().zip(&samples).enumerate() {
        let (min, max) = (s.iter().min().unwrap(), s.iter().max().unwrap());
        let by = if i < engines { format!(" by {}", mechanism[i]) } else { String::new() };
        println!("  {name:<20} {:>9.2?} ({min:.2?}-{max:.2?}){by}", median(s));
    }
    for (engine_i, name) in methods.iter().enumerate().take(engines) {
        if engines > 1 {
            println!("{name}:");
        }
        verdicts(&samples, engine_i, engines, position("limit: read"), rounds);
    }
    Ok(())
}

/// Prints the engine's ratios against the fastest tool and the limit, with the spread of the per-round ratios.
fn verdicts(samples: &[Vec<Duration>], engine_i: usize, engines: usize, limit_i: Option<usize>, rounds: usize) {
    let tools = engines..engines + 3;
    let faster_tool = |round: usize| tools.clone().map(|i| samples[i][round]).min().unwrap();
    let per_round: Vec<f64> =
        (0..rounds).map(|r| faster_tool(r).as_secs_f64() / samples[engine_i][r].as_secs_f64()).collect();
    let fastest = tools.clone().map(|i| median(&samples[i])).min().unwrap();
    let ours = median(&samples[engine_i]);
    println!(
        "  engine vs the fastest tool: {:.2}x (per round {:.2}-{:.2}x) {}",
        fastest.as_secs_f64() / ours.as_secs_f64(),
        per_round.iter().cloned().fold(f64::MAX, f64::min),
        per_round.iter().cloned().fold(0.0, f64::max),
        if ours <= fastest { "(engine at least as fast)" } else { "(engine SLOWER)" }
    );
    if let Some(l) = limit_i {
        // A copy reads and writes the same disk: it takes the read time plus the write time unless the disk serves
        // both at once, when the larger of the two bounds it. Both are printed; the verdict is against the sum.
        let (read, write) = (median(&samples[l]), median(&samples[l + 1]));
        let serial = read + write;
        let per_round: Vec<f64> = (0..rounds)
            .map(|r| samples[engine_i][r].as_secs_f64() / (samples[l][r] + samples[l + 1][r]).as_secs_f64())
            .collect();
        println!(
            "  engine vs the limit (read {read:.2?} + write {write:.2?} = {serial:.2?}): {:.2}x the limit's time (per \
             round {:.2}-{:.2}x) {}; the bound if reads and writes overlapped fully, {:.2?}: {:.2}x",
            ours.as_secs_f64() / serial.as_secs_f64(),
            per_round.iter().cloned().fold(f64::MAX, f64::min),
            per_round.iter().cloned().fold(0.0, f64::max),
            if ours.as_secs_f64() <= serial.as_secs_f64() * 1.1 { "(within 10%)" } else { "(MORE than 10% over)" },
            read.max(write),
            ours.as_secs_f64() / read.max(write).as_secs_f64(),
        );
    }
}

/// A full copy on a reflink filesystem: the engine's default plan there shares blocks.
fn bench_clone(rt: &tokio::runtime::Runtime, engine: &Engine, dir: &Path, rounds: usize) -> anyhow::Result<()> {
    let calibration = rt.block_on(engine.calibrate(dir, &OpControl::new()))?;
    let plan = calibration.plan;
    let src = dir.join("src-full.raw");
    make_source(&src, SHAPES[1])?;
    let dst = dir.join("dst.raw");
    let mut times = Vec::new();
    let mut mechanism = String::new();
    for _ in 0..rounds {
        remove(&dst)?;
        let t = Instant::now();
        let opts = CopyOptions { plan: Some(plan.clone()), ..CopyOptions::default() };
        mechanism = rt.block_on(engine.copy(&src, &dst, opts, &OpControl::new()))?.mechanism.to_string();
        times.push(t.elapsed());
    }
    anyhow::ensure!(sha256sum(&dst)? == sha256sum(&src)?, "clone differs from the source");
    remove(&dst)?;
    println!(
        "\n== clone on {} ({}): 2 GiB fully allocated, median of {rounds}: {:.2?} by {mechanism}",
        dir.display(),
        calibration.filesystem,
        median(&times)
    );
    Ok(())
}

/// Writes the shape's data (xorshift, so nothing compresses); rewritten only when missing or of another shape.
fn make_source(path: &Path, shape: Shape) -> io::Result<()> {
    let want_alloc = SIZE / shape.period * shape.data;
    if fs::metadata(path).is_ok_and(|m| m.len() == SIZE && (m.blocks() * 512).abs_diff(want_alloc) < 16 * MIB) {
        return Ok(());
    }
    let _ = fs::remove_file(path);
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.set_len(SIZE)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; (4 * MIB).min(shape.data) as usize];
    for start in (0..SIZE).step_by(shape.period as usize) {
        for off in (start..start + shape.data).step_by(buf.len()) {
            for word in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all_at(&buf, off)?;
        }
    }
    file.sync_all()
}

/// The data extents, by SEEK_DATA/SEEK_HOLE.
fn data_extents(path: &Path) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom;
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(&file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(&file, SeekFrom::Hole(start))?.min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// A 4 MiB buffer aligned for O_DIRECT.
fn aligned_buf() -> Vec<u8> {
    // Over-allocate and use an aligned window: plain Vec, no unsafe.
    vec![0u8; 5 * MIB as usize]
}

fn window(buf: &mut [u8]) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(4096);
    &mut buf[skip..skip + 4 * MIB as usize]
}

/// Reads every data extent with O_DIRECT in 4 MiB `pread`s, one at a time.
fn read_direct(src: &Path, extents: &[(u64, u64)]) -> io::Result<()> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(src)?;
    let mut storage = aligned_buf();
    let buf = window(&mut storage);
    for &(start, end) in extents {
        let mut off = start;
        while off < end {
            let len = (end - off).min(buf.len() as u64).div_ceil(4096) * 4096;
            let n = file.read_at(&mut buf[..len as usize], off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Writes the same extents into a new file with O_DIRECT in 4 MiB `pwrite`s, then fsyncs it and its directory.
fn write_direct(dst: &Path, extents: &[(u64, u64)]) -> io::Result<()> {
    let file = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(dst)?;
    let mut storage = aligned_buf();
    let buf = window(&mut storage);
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 7 + 1) as u8);
    for &(start, end) in extents {
        let mut off = start;
        while off < end {
            let len = (end - off).min(buf.len() as u64).div_ceil(4096) * 4096;
            file.write_all_at(&buf[..len as usize], off)?;
            off += len;
        }
    }
    make_durable(dst)
}

fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn prepare_cache(src: &Path, cold: bool) -> io::Result<()> {
    if cold {
        drop_caches();
    } else {
        // Warm: the whole source in the page cache for every method alike.
        io::copy(&mut File::open(src)?, &mut io::sink())?;
    }
    Ok(())
}

/// Runs a copy tool, then makes its copy as durable as the engine's.
fn tool(cmd: &mut Command, dst: &Path) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(make_durable(dst)?)
}

fn make_durable(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()?;
    File::open(path.parent().unwrap())?.sync_all()
}

fn sha256sum(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg("-b").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}: {}", path.display(), out.status);
    Ok(String::from_utf8_lossy(&out.stdout[..64]).into_owned())
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn allocated(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s[s.len() / 2]
}
