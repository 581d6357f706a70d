//! `drover-bench [--smoke] [--out DIR] <scenario>... | all`: Drover's speed,
//! cost and footprint, printed as tables and written as JSON.

use std::path::PathBuf;

use drover_tests::bench::{self, Options, SCENARIOS};

fn usage() -> String {
    let mut text = String::from(
        "usage: drover-bench [--smoke] [--out DIR] <scenario>... | all\n\nscenarios:\n",
    );
    for (name, what) in SCENARIOS {
        text.push_str(&format!("  {name:<11} {what}\n"));
    }
    text
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut opts = Options {
        smoke: false,
        out_dir: PathBuf::from("target/bench"),
    };
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => opts.smoke = true,
            "--out" => {
                opts.out_dir = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow::anyhow!("--out needs a directory"))?
            }
            "-h" | "--help" => {
                print!("{}", usage());
                return Ok(());
            }
            name if !name.starts_with('-') => names.push(name.to_string()),
            other => anyhow::bail!("unknown option {other}\n{}", usage()),
        }
    }
    if names.is_empty() {
        anyhow::bail!("name a scenario\n{}", usage());
    }
    bench::run(&names, &opts).await?;
    Ok(())
}
