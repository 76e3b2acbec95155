//! `iom completions SHELL` and `iom man`: generated from the clap definitions, so they never
//! drift from the real flags.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::Failure;
use crate::args::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "iom", &mut out);
    std::io::stdout()
        .write_all(&out)
        .context("cannot write to stdout")?;
    Ok(())
}

/// Prints the top-level man page, or writes every page into `out_dir`.
pub fn man(out_dir: Option<&Path>) -> Result<(), Failure> {
    let cmd = Cli::command();
    match out_dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("cannot render the man page")?;
            std::io::stdout()
                .write_all(&out)
                .context("cannot write to stdout")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
        }
    }
    Ok(())
}
