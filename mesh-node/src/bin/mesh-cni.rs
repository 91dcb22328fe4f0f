//! `mesh-cni`: the chained CNI plugin that holds pods of mesh namespaces back while their node
//! proxy cannot redirect them (see `mesh_node::pods::cni`).
use std::{io::Read, process::ExitCode};

/// `mesh-cni install CONF_DIR BIN_DIR [STATE_DIR]`: what the DaemonSet's init container runs on
/// each node. The plugin reaches the proxy on `STATE_DIR/admin.sock`. (Runtimes call a plugin
/// without arguments: those runs are CNI calls.)
fn install(args: &[String]) -> ExitCode {
    let [conf_dir, bin_dir, rest @ ..] = args else {
        eprintln!("usage: mesh-cni install CONF_DIR BIN_DIR [STATE_DIR]");
        return ExitCode::FAILURE;
    };
    if rest.len() > 1 {
        eprintln!(
            "usage: mesh-cni install CONF_DIR BIN_DIR [STATE_DIR] (the admin address is gone: the proxy takes changes on STATE_DIR/admin.sock only)"
        );
        return ExitCode::FAILURE;
    }
    let state_dir = rest.first().map_or("/var/lib/mesh-node", String::as_str);
    let entry = serde_json::json!({"type": "mesh-cni", "stateDir": state_dir});
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    match mesh_node::pods::cni::install(conf_dir.as_ref(), bin_dir.as_ref(), &exe, entry) {
        Ok(list) => {
            println!("mesh-cni chained in {}", list.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-cni install: {}", mesh_api::placement::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "install") {
        return install(&args[1..]);
    }
    let env = mesh_node::pods::cni::Env {
        command: std::env::var("CNI_COMMAND").unwrap_or_default(),
        netns: std::env::var("CNI_NETNS").unwrap_or_default(),
        args: std::env::var("CNI_ARGS").unwrap_or_default(),
    };
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    match mesh_node::pods::cni::run(&env, &stdin) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            println!(
                "{}",
                serde_json::json!({"cniVersion": "1.0.0", "code": code, "msg": msg})
            );
            ExitCode::FAILURE
        }
    }
}
