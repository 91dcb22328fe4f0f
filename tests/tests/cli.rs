//! mesh-node's start-up contract: bad config and missing kernel features exit non-zero with the
//! field or feature named, before touching the kernel.
use std::process::Command;

fn mesh_node(args: &[&str]) -> (i32, String) {
    let bin = mesh_tests::find_bin("mesh-node").unwrap();
    let out = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_non_zero_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "run",
                "--node-name",
                "n1",
                "--cgroup",
                "/sys/fs/cgroup/unified",
            ],
            "invalid --proxy-ipv4: neither",
        ),
        (
            &[
                "run",
                "--node-name",
                "n1",
                "--cgroup",
                "/sys/fs/cgroup/unified",
                "--proxy-ipv4",
                "127.0.0.1",
            ],
            "invalid --proxy-ipv4: 127.0.0.1 is not reachable from pods",
        ),
        (
            &[
                "run",
                "--node-name",
                "N!",
                "--cgroup",
                "/x",
                "--proxy-ipv4",
                "10.0.0.1",
            ],
            "invalid --node-name",
        ),
        (
            &[
                "run",
                "--node-name",
                "n1",
                "--cgroup",
                "/x",
                "--proxy-ipv4",
                "10.0.0.1",
                "--exclude-cidrs",
                "nope",
            ],
            "invalid --exclude-cidrs",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = mesh_node(args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(
            stderr.contains(expected),
            "{args:?}: stderr {stderr:?} lacks {expected:?}"
        );
    }
}

#[test]
fn a_directory_that_is_not_cgroup2_is_refused_by_name() {
    let dir = std::env::temp_dir();
    let (code, stderr) = mesh_node(&[
        "run",
        "--node-name",
        "probe-test",
        "--cgroup",
        dir.to_str().unwrap(),
        "--proxy-ipv4",
        "10.0.0.1",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("kernel check failed") && stderr.contains("is not a cgroup v2 directory"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_ebpf_object_is_named() {
    let (code, stderr) = mesh_node(&[
        "run",
        "--node-name",
        "object-test",
        "--cgroup",
        "/sys/fs/cgroup/unified",
        "--proxy-ipv4",
        "10.0.0.1",
        "--ebpf-object",
        "/nonexistent/mesh-ebpf.o",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cannot read eBPF object /nonexistent/mesh-ebpf.o"),
        "{stderr}"
    );
}

/// An inbound program this kernel cannot run, asked for by name, stops the start with one line
/// naming the missing feature, before anything is pinned or attached. The kernel matrix runs this
/// where the helper form cannot load (6.1, 6.12); where both forms load (6.18), the probe must say
/// so, and `inbound_mode` runs each.
#[test]
fn an_inbound_program_the_kernel_cannot_run_is_refused_by_name() {
    let bin = mesh_tests::find_bin("mesh-node").unwrap();
    let out = Command::new(bin)
        .args(["probe", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let available = |name: &str| {
        probe["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {probe}"))["available"]
            == true
    };
    let forms = [
        ("helper", available("helper_get_netns_cookie_cgroup_skb")),
        (
            "btf",
            available("helper_skc_to_tcp_sock_cgroup_skb") && available("btf_sock_netns"),
        ),
    ];
    assert!(forms.iter().any(|(_, ok)| *ok), "{probe}");
    for (form, _) in forms.iter().filter(|(_, ok)| !ok) {
        let node = format!("cli-inbound-{}", std::process::id());
        let (code, stderr) = mesh_node(&[
            "run",
            "--node-name",
            &node,
            "--cgroup",
            "/sys/fs/cgroup/unified",
            "--proxy-ipv4",
            "10.0.0.1",
            "--inbound-program",
            form,
        ]);
        assert_ne!(code, 0, "{stderr}");
        assert!(stderr.contains("lacks inbound_pod_lookup"), "{stderr}");
        assert!(
            !std::path::Path::new("/sys/fs/bpf/mesh")
                .join(&node)
                .exists(),
            "a refused start pinned state"
        );
    }
}
