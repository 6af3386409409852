//! Turns the raw output of the VM's fio matrix into bench/results/<stamp>.{json,md,svg}.
//! Run by `bench/run`; refuses an incomplete matrix.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bench::matrix::Matrix;
use bench::render;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Report of bench/run's fio matrix: JSON, markdown table, SVG plot")]
struct Args {
    /// Directory unpacked from the VM: raw/, copy/, machine.json.
    #[arg(long)]
    input: PathBuf,
    /// Where <stamp>.json, <stamp>.md and <stamp>.svg go.
    #[arg(long)]
    output: PathBuf,
    /// Timestamp naming the files.
    #[arg(long)]
    stamp: String,
    /// The host machine, for the record.
    #[arg(long, default_value = "")]
    host: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let m = Matrix::load(&a.input).context("loading the matrix")?;
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let base = a.output.join(&a.stamp);
    let write = |ext: &str, text: String| -> Result<()> {
        let p = base.with_extension(ext);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write(
        "json",
        serde_json::to_string_pretty(&m.to_json(&a.stamp, &a.host))?,
    )?;
    write("md", render::markdown(&m, &a.stamp, &a.host))?;
    write("svg", render::svg(&m, &a.stamp))?;
    Ok(())
}
