//! `tether compile-worker`: the child a host compiles in (see `runtime::worker`).

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct CompileWorkerArgs {
    /// The host's `limits.memory_mib`, which shapes the compiled code.
    #[arg(long)]
    memory_mib: u32,
    /// Where the compiled artefact goes.
    #[arg(long)]
    out: PathBuf,
}

/// Compiles the module on stdin into `--out`.
pub fn run(args: &CompileWorkerArgs) -> anyhow::Result<()> {
    tether_host::runtime::worker::serve(args.memory_mib, &args.out)
}
