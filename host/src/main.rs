//! The `tether` command line: one file per command under `cli/`.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tether", version, about = "Runs Electric Imp-style agents as sandboxed WebAssembly")]
struct Cli {
    /// Threads for the host's I/O and its agents (default: one per core). 1 runs them all
    /// on one thread: a busy agent's messages then cost the least CPU (no hand-offs between
    /// threads; see BENCHMARKS.md), but a disk write of one agent holds up the others.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    io_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a crate for an agent of your own, from a template.
    New(cli::new::NewArgs),
    /// Builds an agent crate and checks it against the agent world.
    Build(cli::build::BuildArgs),
    /// Runs an agent crate's tests (tests/, with tether-testkit) for this machine.
    Test(cli::test::TestArgs),
    /// Runs one agent (a component, or a crate directory it builds first) until Ctrl-C.
    Run(cli::run::RunArgs),
    /// Runs every agent of a host manifest, and the management API, until Ctrl-C.
    Serve(cli::serve::ServeArgs),
    /// Runs on the box with a device's serial port and carries its line over a cluster's
    /// NATS to the device's agent, wherever it runs.
    Gateway(cli::gateway::GatewayArgs),
    /// Manages the agents of a `tether serve` through its management API.
    Agents(cli::agents::AgentsArgs),
    /// Runs the local Azure IoT Hub + DPS emulator until Ctrl-C, and prints ready-made
    /// connection strings.
    Hub(cli::hub::HubArgs),
    /// The whole flow on this machine: the hub emulator, a simulated sensor board on a
    /// pty and the azure-demo agent between them (provisioning, telemetry, twin, direct
    /// methods, C2D). Ctrl-C ends it.
    Demo(cli::demo::DemoArgs),
    /// Compiles the module on stdin for the host that started it (internal).
    #[command(hide = true)]
    CompileWorker(cli::compile_worker::CompileWorkerArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")),
        )
        .with_target(false)
        // Logs go to stderr, leaving stdout to what a command prints for scripts; colour
        // only on a terminal, and never with NO_COLOR set (https://no-color.org).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        .init();
    let cli = Cli::parse();
    let runtime = match cli.io_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n.into()).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one command.
async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New(args) => cli::new::new(&args),
        Command::Build(args) => cli::build::build(&args),
        Command::Test(args) => cli::test::test(&args),
        Command::Run(args) => cli::run::run(args).await,
        Command::Serve(args) => cli::serve::serve(args).await,
        Command::Gateway(args) => cli::gateway::gateway(args).await,
        Command::Agents(args) => cli::agents::agents(args).await,
        Command::Hub(args) => cli::hub::hub(args).await,
        Command::Demo(args) => cli::demo::demo(args).await,
        Command::CompileWorker(args) => cli::compile_worker::run(&args),
    }
}
