use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_node::{app, config::RunArgs};

/// Node proxy of the mesh: redirects enrolled pods' TCP connections to itself and relays them.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long, global = true, env = "MESH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node proxy.
    Run(Box<RunArgs>),
    /// Uninstall from this node: detach the programs, remove pinned maps and enrollment state.
    Detach {
        #[arg(long, env = "MESH_NODE_NAME")]
        node_name: String,
        #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long, env = "MESH_PIN_DIR")]
        pin_dir: Option<PathBuf>,
        #[arg(long, env = "MESH_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Probe this kernel for every feature the programs use and print the table (what
    /// `mesh-node run` checks at start). Exits non-zero when a required feature is missing.
    Probe {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mesh_node::telemetry::logging::init(cli.log_json);
    let result = match cli.cmd {
        Cmd::Run(args) => run(*args),
        Cmd::Probe { json } => {
            let kernel =
                mesh_node::kernel::probe::kernel(true, mesh_node::config::InboundProgram::Auto);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&kernel).expect("serializable")
                );
            } else {
                print!("{}", kernel.table());
            }
            kernel.require().map_err(anyhow::Error::from)
        }
        Cmd::Detach {
            node_name,
            bpffs,
            pin_dir,
            state_dir,
        } => {
            let pin_dir = pin_dir.unwrap_or_else(|| bpffs.join("mesh").join(&node_name));
            let state_dir =
                state_dir.unwrap_or_else(|| PathBuf::from("/run/mesh-node").join(&node_name));
            mesh_node::kernel::ebpf::detach(&pin_dir)
                .with_context(|| format!("detaching {}", pin_dir.display()))
                .and_then(|()| {
                    mesh_node::app::forget_state(&state_dir)
                        .context("removing enrollment state and kept certificates")
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    tracing::info!(config = %serde_json::to_string(&config)?, "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()?;
    let on_exit = config.on_exit;
    let cleanup = config.clone();
    rt.block_on(async {
        let bound = match app::build(config).await {
            Ok(b) => b,
            Err(e) => {
                // A start that fails leaves the kernel as it found it (see `Redirector::load`),
                // except that `--on-exit detach` means "no redirection once this process is gone".
                if on_exit == mesh_node::config::OnExit::Detach {
                    app::detach(&cleanup);
                }
                return Err(e.into());
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            _ = bound.handed_over() => tracing::info!("handed over to the next generation"),
        }
        bound.shutdown().await;
        anyhow::Ok(())
    })
}

/// jemalloc instead of glibc's allocator: glibc's per-thread arenas fragment in a long-running
/// proxy, and its malloc and free (with `malloc_consolidate` for the larger per-request futures)
/// were 4% of the HTTP path's CPU. Unused pages go back to the system within a second (a
/// background thread purges them): memory after a burst measured the same as with glibc.
mod allocator {
    #[global_allocator]
    static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    // SAFETY: jemalloc reads this symbol once, as `const char *malloc_conf`: a reference to a
    // byte array is a thin pointer to this NUL-terminated string, which lives as long as the
    // program, and nothing else defines the symbol (the jemalloc crate prefixes its symbols
    // with `_rjem_`).
    #[unsafe(export_name = "_rjem_malloc_conf")]
    static MALLOC_CONF: &[u8; 60] =
        b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
}
