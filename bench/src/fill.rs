//! `ferry-bench fill`: what filling the destination's memory costs on this host, the way
//! the destination sidecar fills it (`GuestRegion::create` + `populate`, with and without
//! its request for transparent huge pages), so the whole-migration figures can be read
//! against it.
//!
//! Two things decide the rate: the page size the kernel allocates in (4 KiB, or 2 MiB
//! where `shmem_enabled` allows huge pages on request), and where the memory comes from.
//! A guest kernel that reports freed memory to its hypervisor (virtio-balloon free page
//! reporting, `/sys/module/page_reporting`) gives it back about two seconds after it is
//! freed; touching it again then faults in the hypervisor too. So each way is measured
//! on memory freed just before ("recycled") and on memory freed `--pause-s` earlier.

use std::time::Duration;

use anyhow::Context;
use ferry_proto::mem::GuestRegion;

use crate::report::spread;

/// Options of `ferry-bench fill`.
#[derive(clap::Args, Debug)]
pub struct FillArgs {
    /// Memory filled per run, MiB.
    #[arg(long, default_value_t = 2048)]
    pub mem_mib: u64,
    /// Threads filling (the destination's `populate = "ahead"` uses 2).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs per way.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seconds between freeing memory and filling again, for the "returned" case.
    #[arg(long, default_value_t = 4)]
    pub pause_s: u64,
}

/// Fills `mib` MiB once, freshly created; GB/s.
fn once(mib: u64, threads: usize, huge: bool) -> anyhow::Result<f64> {
    let (m, _fd) = GuestRegion::create("ferry-bench-fill", mib << 20).context("memfd")?;
    if huge {
        m.advise_huge();
    }
    let took = m.populate(threads).context("populate")?;
    Ok((mib << 20) as f64 / took.as_secs_f64().max(1e-9) / 1e9)
}

/// The host's free page reporting to a hypervisor, as one phrase.
fn reporting() -> String {
    match std::fs::read_to_string("/sys/module/page_reporting/parameters/page_reporting_order") {
        Ok(o) => format!(
            "this guest reports freed memory to its hypervisor (page_reporting_order {})",
            o.trim()
        ),
        Err(_) => "no free page reporting (bare metal, or a guest without it)".into(),
    }
}

/// Runs the benchmark; the last line is the ratio of the huge-page rate to the 4 KiB
/// rate on recycled memory.
///
/// # Errors
///
/// Not root (setting `shmem_enabled`), or memory running out.
pub fn run(a: &FillArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0 && a.mem_mib > 0, "need runs and memory");
    println!(
        "ferry-bench fill: {} MiB memfd filled with MADV_POPULATE_WRITE by {} threads, as the destination fills its copy; {} runs per way; {}",
        a.mem_mib,
        a.threads,
        a.runs,
        reporting()
    );
    println!(
        "{:>22} {:>24} {:>24}",
        "way", "recycled GB/s", "returned GB/s"
    );
    let mut rows = Vec::new();
    let mut records = Vec::new();
    let mut recycled_median = [0.0; 2];
    for (i, (name, mode)) in [("4 KiB pages", "never"), ("2 MiB THP (advise)", "advise")]
        .into_iter()
        .enumerate()
    {
        let _thp = ferry_tests::ShmemThp::set(mode)?;
        let huge = mode == "advise";
        let (mut recycled, mut returned) = (Vec::new(), Vec::new());
        for _ in 0..a.runs {
            // Memory freed a moment ago: one fill to free, then the measured one.
            once(a.mem_mib, a.threads, huge)?;
            recycled.push(once(a.mem_mib, a.threads, huge)?);
            std::thread::sleep(Duration::from_secs(a.pause_s));
            returned.push(once(a.mem_mib, a.threads, huge)?);
        }
        let (rm, rl, rh) = spread(recycled.clone());
        let (tm, tl, th) = spread(returned.clone());
        recycled_median[i] = rm;
        println!(
            "{name:>22} {:>24} {:>24}",
            format!("{rm:.2} [{rl:.2}-{rh:.2}]"),
            format!("{tm:.2} [{tl:.2}-{th:.2}]")
        );
        rows.push((name.to_owned(), vec![rm, tm]));
        records.push(serde_json::json!({
            "way": name, "shmem_enabled": mode, "recycled_gbps": recycled,
            "returned_gbps": returned, "recycled_median": rm, "returned_median": tm,
        }));
    }
    let ratio = recycled_median[1] / recycled_median[0].max(1e-9);
    crate::report::record(
        "fill",
        &serde_json::json!({
            "mem_mib": a.mem_mib, "threads": a.threads, "runs": a.runs, "pause_s": a.pause_s,
            "reporting": reporting(), "ways": records, "thp_over_4k_recycled": ratio,
        }),
        &[(
            "fill",
            crate::report::grouped_bars(
                "Filling destination memory (median of runs)",
                "GB/s",
                &["recycled", "returned to the hypervisor"],
                &rows,
            ),
        )],
    )?;
    println!("fill GB/s thp/4k: {ratio:.1}");
    Ok(())
}
