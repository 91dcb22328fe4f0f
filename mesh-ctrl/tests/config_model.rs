//! The config model: committed CRDs match the Rust types, the example config is valid, and each
//! kind of bad input is rejected with the field and the reason.
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test
use std::{path::PathBuf, process::Command};

use mesh_ctrl::model::{self, objects::Objects, validate::validate};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let path = repo().join("manifests/crds/nodemesh.io.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == model::crds_yaml(),
        "{} is out of date: run `cargo xtask crds` and commit the result",
        path.display()
    );
}

#[test]
fn the_example_config_is_valid() {
    let objects = Objects::load(&repo().join("manifests/examples")).expect("parses");
    assert_eq!(validate(&objects), vec![]);
    assert_eq!(objects.refs().len(), 19, "shop.yaml and demo.yaml");
}

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 80}]
"#;

/// One invalid object per case: the field and (part of) the reason it must be rejected with.
#[test]
fn invalid_objects_are_rejected_with_field_and_reason() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: nope, port: 80}]",
            "spec.rules[0].backendRefs[0].name",
            "unknown backend",
        ),
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '(['}}]",
            "spec.rules[0].matches[0].path.value",
            "does not compile",
        ),
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{name: gw}]",
            "spec.parentRefs[0].kind",
            "only applies routes attached to a Service",
        ),
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - filters: [{type: ExtensionRef}]",
            "spec.rules[0].filters[0].type",
            "not supported",
        ),
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web, port: 81}]",
            "spec.rules[0].backendRefs[0].port",
            "has no port 81",
        ),
        (
            "kind: HTTPRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}",
            "spec.rules[0].timeouts.backendRequest",
            "longer than the request timeout",
        ),
        (
            "kind: GRPCRoute\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{method: {type: Exact}}]",
            "spec.rules[0].matches[0].method",
            "needs a service",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nspec:\n  action: ALLOW\n  rules:\n  - from: [{principals: ['web']}]",
            "spec.rules[0].from[0].principals[0]",
            "not a SPIFFE ID",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nspec:\n  action: DENY\n  rules:\n  - from: [{ipBlocks: ['10.0.0.0/33']}]",
            "spec.rules[0].from[0].ipBlocks[0]",
            "not a CIDR",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nspec:\n  action: DENY",
            "spec.rules",
            "matches nothing",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nspec:\n  action: ALLOW\n  rules:\n  - to: [{headers: [{name: x, regex: '*'}]}]",
            "spec.rules[0].to[0].headers[0].regex",
            "does not compile",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: nope}",
            "spec.targetRef.name",
            "no Service shop/nope",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: web}\n  retries: {attempts: 2, perTryTimeout: soon}",
            "spec.retries.perTryTimeout",
            "not a duration",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: web}\n  retries: {attempts: 2, retryOn: [sometimes]}",
            "spec.retries.retryOn[0]",
            "unknown condition",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: web}\n  faults: {abort: {percent: 10, httpStatus: 503, grpcStatus: 14}}",
            "spec.faults.abort",
            "exactly one of",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: web}\n  faults: {delay: {percent: 150, fixedDelay: 1s}}",
            "spec.faults.delay.percent",
            "not a percentage",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nspec:\n  targetRef: {name: web}\n  loadBalancer: {policy: CONSISTENT_HASH}",
            "spec.loadBalancer.hashHeader",
            "required",
        ),
        (
            "apiVersion: nodemesh.io/v1alpha1\nkind: Telemetry\nspec:\n  accessLogging: {enabled: true, samplePercent: 120}",
            "spec.accessLogging.samplePercent",
            "not between 0 and 100",
        ),
    ];
    for (doc, field, reason) in cases {
        let doc = if doc.starts_with("kind: HTTPRoute") || doc.starts_with("kind: GRPCRoute") {
            format!("apiVersion: gateway.networking.k8s.io/v1\n{doc}")
        } else {
            doc.to_string()
        };
        let doc = doc.replacen('\n', "\nmetadata: {name: bad, namespace: shop}\n", 1);
        let mut objects = Objects::default();
        objects
            .add_yaml("case", &format!("{BASE}---\n{doc}"))
            .unwrap_or_else(|e| panic!("{doc}\nparses: {e}"));
        let invalid = validate(&objects);
        assert!(
            invalid
                .iter()
                .any(|i| i.object.name == "bad" && i.field == *field && i.reason.contains(reason)),
            "{doc}\nexpected {field}: {reason}, got {invalid:#?}"
        );
    }
}

#[test]
fn conflicts_reject_the_newer_object() {
    let mut objects = Objects::default();
    objects
        .add_yaml(
            "case",
            &format!(
                "{BASE}---
apiVersion: nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {{name: a, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec: {{mode: STRICT}}
---
apiVersion: nodemesh.io/v1alpha1
kind: PeerAuthentication
metadata: {{name: b, namespace: shop, creationTimestamp: '2025-01-01T00:00:00Z'}}
spec: {{mode: PERMISSIVE}}
---
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: one, namespace: shop}}
spec: {{targetRef: {{name: web}}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: two, namespace: shop}}
spec: {{targetRef: {{name: web}}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Telemetry
metadata: {{name: logs, namespace: shop, creationTimestamp: '2025-01-01T00:00:00Z'}}
spec: {{accessLogging: {{enabled: true}}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Telemetry
metadata: {{name: more-logs, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec: {{accessLogging: {{enabled: false}}}}
"
            ),
        )
        .expect("parses");
    let invalid: Vec<(String, String)> = validate(&objects)
        .into_iter()
        .map(|i| (i.object.name, i.field))
        .collect();
    assert_eq!(
        invalid,
        vec![
            ("a".to_string(), "spec.selector".to_string()),
            ("more-logs".to_string(), "metadata.namespace".to_string()),
            ("two".to_string(), "spec.targetRef".to_string()),
        ]
    );
}

#[test]
fn schema_errors_name_the_field() {
    let mut objects = Objects::default();
    let err = objects
        .add_yaml(
            "f.yaml",
            "apiVersion: nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {mode: LOOSE}\n",
        )
        .expect_err("bad enum");
    let msg = err.to_string();
    assert!(
        msg.contains("field `spec.mode`") && msg.contains("LOOSE"),
        "{msg}"
    );
    let err = objects
        .add_yaml(
            "f.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .expect_err("unknown kind");
    assert!(
        err.to_string().contains("unsupported kind v1/ConfigMap"),
        "{err}"
    );
}

#[test]
fn check_command_reports_and_exits_nonzero() {
    let bin = env!("CARGO_BIN_EXE_mesh-ctrl");
    let ok = Command::new(bin)
        .args(["check", "--output", "json"])
        .arg(repo().join("manifests/examples"))
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{ok:?}");
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(v["objects"], 19);

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\nspec: {targetRef: {name: ghost}}\n",
    )
    .expect("write");
    let out = Command::new(bin)
        .arg("check")
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TrafficPolicy shop/t: spec.targetRef.name: no Service shop/ghost"),
        "{text}"
    );

    // The same from standard input.
    let mut child = Command::new(bin)
        .args(["check", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &std::fs::read(&bad).unwrap())
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("ends");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no Service shop/ghost"));

    std::fs::write(&bad, "kind: [").expect("write");
    let out = Command::new(bin)
        .arg("check")
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
