use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_ctrl::{
    app::{self, ServeArgs},
    cli::{Output, check, remote},
    model,
};
use tracing_subscriber::EnvFilter;

/// The mesh controller.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "MESH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the certificate authority and certificate service.
    Serve(Box<ServeArgs>),
    /// Validate mesh config (a YAML file, a directory of them, or - for stdin) as the controller
    /// would; exits 1 when anything is invalid.
    Check {
        path: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Print the CustomResourceDefinitions of the mesh's own kinds.
    Crds,
    /// Nodes subscribed, the versions they acknowledged, rejected objects, certificates close to
    /// expiry.
    Status(Remote),
    /// Accepted configuration versions, newest first.
    History(Remote),
    /// Restore the object set of an earlier version; nodes converge to it.
    Rollback {
        version: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Which route, backends, authorization rule and inbound mode apply to a connection from POD
    /// (NAMESPACE/NAME) to DESTINATION (IP:PORT or SERVICE.NAMESPACE:PORT), and why.
    Explain {
        pod: String,
        destination: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Flags of the subcommands that ask a running controller.
#[derive(clap::Args)]
struct Remote {
    /// The controller's admin endpoint.
    #[arg(long, env = "MESH_CTRL_ADMIN", default_value = "127.0.0.1:15014")]
    admin: std::net::SocketAddr,
    #[arg(long, short, value_enum, default_value_t)]
    output: Output,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let args = match cli.cmd {
        Cmd::Serve(args) => *args,
        Cmd::Check { path, output } => return run_check(&path, output),
        Cmd::Crds => {
            print!("{}", model::crds_yaml());
            return ExitCode::SUCCESS;
        }
        Cmd::Status(r) => return ask(&r, "GET", "/v1/status".into(), remote::human_status),
        Cmd::History(r) => return ask(&r, "GET", "/v1/history".into(), remote::human_history),
        Cmd::Rollback { version, remote } => {
            return ask(&remote, "POST", format!("/v1/rollback/{version}"), |v| {
                format!(
                    "rolled back to version {}: wrote {}\n",
                    v["rolled_back_to"], v["written"]
                )
            });
        }
        Cmd::Explain {
            pod,
            destination,
            remote,
        } => {
            let path = format!(
                "/v1/explain?pod={}&dest={}",
                remote::encode(&pod),
                remote::encode(&destination)
            );
            return ask(&remote, "GET", path, remote::human_explain);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-ctrl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        let bound = app::serve(args).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        bound.shutdown().await;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-ctrl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_check(path: &str, output: Output) -> ExitCode {
    match check::check(path) {
        Ok(report) => {
            match output {
                Output::Human => print!("{}", report.human()),
                Output::Json => println!("{}", report.json()),
            }
            if report.invalid.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("mesh-ctrl: {}", mesh_api::placement::error_chain(&e));
            ExitCode::from(2)
        }
    }
}

fn ask(
    r: &Remote,
    method: &str,
    path: String,
    human: fn(&serde_json::Value) -> String,
) -> ExitCode {
    match remote::call(r.admin, method, &path) {
        Ok(v) => {
            match r.output {
                Output::Human => print!("{}", human(&v)),
                Output::Json => println!("{v}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-ctrl: {}", mesh_api::placement::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
