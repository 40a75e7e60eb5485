//! `ferry-ch-guest`: writes the PVH test guest kernel for Cloud Hypervisor, and reads
//! its serial log.
//!
//! - `ferry-ch-guest write <path>`: the kernel (`cloud-hypervisor --kernel <path>`).
//! - `ferry-ch-guest progress <serial log>`: one JSON object: `started`, `pass`, `bad`,
//!   `bad_lines`.

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", path] => std::fs::write(path, ferry_ch_guest::GUEST_ELF)
            .with_context(|| format!("writing {path}")),
        ["progress", path] => {
            let p = ferry_ch_guest::progress(std::path::Path::new(path));
            println!("{}", serde_json::to_string(&p)?);
            Ok(())
        }
        _ => bail!("usage: ferry-ch-guest write <path> | progress <serial log>"),
    }
}
