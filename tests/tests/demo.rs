//! The demo keeps what it promises: after `mesh-demo --keep` returns, every "Try:" line it printed
//! works as printed, the controller still follows its config directory, and `demo down` removes
//! it all. (It uses the demo's own name, so it replaces a demo a developer kept running.)
use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

fn demo(args: &[&str]) -> Output {
    Command::new(mesh_tests::find_bin("mesh-demo").unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// Removes the kept demo even when an assertion fails.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let out = demo(&["down"]);
        assert!(out.status.success() || std::thread::panicking());
    }
}

fn shell(line: &str) -> Output {
    Command::new("bash")
        .args(["-c", &format!("timeout 20 {line}")])
        .output()
        .unwrap()
}

/// The lines printed under `heading`, up to the next line that does not start with two spaces.
fn section<'a>(stdout: &'a str, heading: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .skip_while(|l| !l.ends_with(heading))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect()
}

#[test]
fn a_kept_demo_answers_every_line_it_prints() {
    let _down = Down;
    let out = demo(&["--keep"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The demo process is gone: what answers now is what it kept.
    let tries = section(&stdout, "Try:");
    assert!(tries.len() >= 8, "{stdout}");
    for line in &tries {
        let run = shell(line);
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && !text.trim().is_empty(),
            "`{line}` failed ({}): {text}{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
        let expect = if line.contains("/admin/users") {
            "403 Forbidden"
        } else if line.contains("curl -s -i http://") {
            "x-pod: v"
        } else if line.contains("/v1/mesh-config") {
            "\"connected\":true"
        } else if line.contains("mesh-ctrl status") {
            "demo-n0\ttrue"
        } else {
            ""
        };
        assert!(text.contains(expect), "`{line}`: no {expect:?} in {text}");
    }

    // Editing the config directory still reaches the nodes.
    let dir = section(&stdout, "Where:")
        .into_iter()
        .find_map(|l| l.strip_prefix("config directory: "))
        .and_then(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .expect("the demo names its config directory");
    std::fs::write(
        dir.join("docs.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: docs, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    )
    .unwrap();
    let config = tries
        .iter()
        .find(|l| l.contains("/v1/mesh-config"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&shell(config).stdout).into_owned();
        if text.contains("default/docs") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never saw the edited config directory: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // `demo down` removes it all.
    let out = demo(&["down"]);
    assert!(out.status.success());
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left: Vec<_> = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with("mesh-demo-"))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "demo down left {left:?}");
}
