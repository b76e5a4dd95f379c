//! Copy benchmark: a 2 GiB raw image, half data and half holes (alternating 64 MiB extents of pseudo-random data and
//! 64 MiB holes), copied by the engine, by `cp --sparse=always` and by `qemu-img convert -O raw`, in the same run.
//! Every timing includes making the copy durable (fsync of file and directory), since the engine always does that;
//! the page cache is dropped before each copy when /proc/sys/vm/drop_caches is writable (root), else every tool
//! copies from a warm cache alike.
//!
//! `cargo bench -p qx-storage` runs it (about a minute; the disk's speed varies between rounds, hence medians). Environment:
//! - `QX_BENCH_DIR`: where the images go (default: cargo's target tmpdir); must have 4 GiB free.
//! - `QX_BENCH_ROUNDS`: rounds per tool, interleaved; the median is reported (default 5).
//! - `QX_BENCH_SWEEP=1`: instead, time the engine over a grid of O_DIRECT, block size and queue depth (how the
//!   defaults were chosen); `QX_BENCH_GRID=direct:1024:4,buffered:512:16,qemu-img,cp` picks the grid.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qx_storage::{CopyOptions, Engine, EngineConfig, OpControl};

const SIZE: u64 = 2 << 30;
const EXTENT: u64 = 64 << 20;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a filter argument from `cargo bench -- <filter>` is ignored.
    let dir = std::env::var_os("QX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qx-copy-bench"));
    fs::create_dir_all(&dir)?;
    let rounds: usize = std::env::var("QX_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;

    let src = dir.join("src.raw");
    let t = Instant::now();
    make_source(&src)?;
    println!(
        "source: {} ({} GiB, {} MiB allocated), written in {:.2?}",
        src.display(),
        SIZE >> 30,
        allocated(&src)? >> 20,
        t.elapsed()
    );

    let cold = drop_caches();
    println!(
        "page cache: {}",
        if cold { "dropped before every copy (cold)" } else { "could not drop (not root?): warm for all tools" }
    );

    let engine = Engine::new(EngineConfig::default())?;
    let t = Instant::now();
    let want = rt.block_on(engine.sha256(&src, &OpControl::new()))?;
    println!("engine sha256 of the source: {:.2?} ({want})", t.elapsed());

    if std::env::var_os("QX_BENCH_SWEEP").is_some() {
        return sweep(&rt, &src, &dir, cold, rounds);
    }

    let dst = dir.join("dst.raw");
    let cfg = engine.config().clone();
    let mut times: Vec<(&str, Vec<Duration>)> =
        vec![("qx engine", Vec::new()), ("cp --sparse=always", Vec::new()), ("qemu-img convert", Vec::new())];
    for round in 0..rounds {
        for (tool, samples) in times.iter_mut() {
            remove(&dst)?;
            prepare_cache(&src, cold)?;
            let t = Instant::now();
            match *tool {
                "qx engine" => {
                    rt.block_on(engine.copy(&src, &dst, CopyOptions::default(), &OpControl::new()))?;
                }
                "cp --sparse=always" => tool_copy("cp", &src, &dst)?,
                _ => tool_copy("qemu-img", &src, &dst)?,
            }
            let elapsed = t.elapsed();
            samples.push(elapsed);
            if round == 0 {
                let got = rt.block_on(engine.sha256(&dst, &OpControl::new()))?;
                anyhow::ensure!(got == want, "{tool}: copy differs from the source");
                println!(
                    "  {tool:<20} round 1: {elapsed:>9.2?}, {} MiB allocated, content verified",
                    allocated(&dst)? >> 20
                );
            }
        }
    }
    remove(&dst)?;

    println!(
        "\nresults (median of {rounds}; engine: queue_depth {} block_size {} KiB direct {}):",
        cfg.queue_depth,
        cfg.block_size >> 10,
        cfg.direct
    );
    let medians: Vec<(&str, Duration)> = times.iter().map(|(t, s)| (*t, median(s))).collect();
    let ours = medians[0].1;
    for (tool, m) in &medians {
        let gib_s = (SIZE as f64 / (1u64 << 30) as f64) / m.as_secs_f64();
        println!(
            "  {tool:<20} {m:>9.2?}  {gib_s:5.2} GiB/s of image  ratio tool/engine {:.2}",
            m.as_secs_f64() / ours.as_secs_f64()
        );
    }
    let faster = medians[1..].iter().map(|(_, m)| *m).min().unwrap();
    println!(
        "engine vs the faster of cp and qemu-img: {:.2}x ({})",
        faster.as_secs_f64() / ours.as_secs_f64(),
        if ours <= faster { "engine at least as fast" } else { "engine SLOWER" }
    );
    Ok(())
}

/// Times the engine alone over a grid of settings: `QX_BENCH_GRID` lists `direct|buffered:block_kib:queue_depth`
/// triples separated by commas (default: a coarse grid), each timed `QX_BENCH_ROUNDS` times, interleaved.
fn sweep(rt: &tokio::runtime::Runtime, src: &Path, dir: &Path, cold: bool, rounds: usize) -> anyhow::Result<()> {
    let dst = dir.join("dst.raw");
    let default_grid = "direct:128:16,direct:1024:4,direct:1024:8,direct:1024:16,direct:4096:2,direct:4096:4,\
                        buffered:128:16,buffered:512:16,buffered:1024:8,buffered:1024:16,buffered:4096:4";
    let grid = std::env::var("QX_BENCH_GRID").unwrap_or_else(|_| default_grid.replace(' ', ""));
    let mut configs = Vec::new();
    for item in grid.split(',') {
        if item == "cp" || item == "qemu-img" {
            configs.push((item.to_owned(), None));
            continue;
        }
        let parts: Vec<&str> = item.split(':').collect();
        anyhow::ensure!(parts.len() == 3, "bad grid entry {item:?}");
        let direct = parts[0] == "direct";
        let block_size = parts[1].parse::<usize>()? << 10;
        let queue_depth = parts[2].parse()?;
        let cfg = EngineConfig { threads: 1, queue_depth, block_size, direct, ..Default::default() };
        configs.push((item.to_owned(), Some(Engine::new(cfg)?)));
    }
    let mut samples = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, (name, engine)) in configs.iter().enumerate() {
            remove(&dst)?;
            prepare_cache(src, cold)?;
            let t = Instant::now();
            match engine {
                Some(engine) => {
                    rt.block_on(engine.copy(src, &dst, CopyOptions::default(), &OpControl::new()))?;
                }
                None => tool_copy(name, src, &dst)?,
            }
            samples[i].push(t.elapsed());
        }
    }
    remove(&dst)?;
    println!("\n{:<22} {:>9} {:>9} {:>9}", "mode:block_kib:qd", "median", "min", "max");
    for ((name, _), s) in configs.iter().zip(&samples) {
        let (min, max) = (s.iter().min().unwrap(), s.iter().max().unwrap());
        println!("{name:<22} {:>9.2?} {min:>9.2?} {max:>9.2?}", median(s));
    }
    Ok(())
}

/// Alternating 64 MiB extents of xorshift data and 64 MiB holes; rewritten only when missing or the wrong size.
fn make_source(path: &Path) -> io::Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == SIZE && m.blocks() * 512 >= SIZE / 2) {
        return Ok(());
    }
    let _ = fs::remove_file(path);
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.set_len(SIZE)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < SIZE {
        for chunk_start in (off..off + EXTENT).step_by(buf.len()) {
            for word in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all_at(&buf, chunk_start)?;
        }
        off += 2 * EXTENT;
    }
    file.sync_all()
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
        // Warm: the whole source in the page cache for every tool alike.
        io::copy(&mut File::open(src)?, &mut io::sink())?;
    }
    Ok(())
}

/// Copies with `cp --sparse=always` or `qemu-img convert -O raw`, then makes the copy as durable as the engine's.
fn tool_copy(tool: &str, src: &Path, dst: &Path) -> anyhow::Result<()> {
    if tool == "cp" {
        run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
    } else {
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(src).arg(dst))?;
    }
    Ok(make_durable(dst)?)
}

fn make_durable(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()?;
    File::open(path.parent().unwrap())?.sync_all()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(())
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
