//! Authorization judges the path the pod will see. A real decoding server (nginx: it decodes
//! `%XX`, merges slashes and resolves dot segments) serves `/admin` behind DENY-prefix,
//! ALLOW-prefix and exact rules; a client in the mesh tries the classic bypasses over HTTP/1.1
//! and HTTP/2. None may reach `/admin`: each is either refused by the mesh (400 or 403) or
//! reaches something else.
use mesh_tests::{Cluster, ClusterBuilder, Pod};
use serde_json::json;

const PORT: u16 = 8080;
const WEB: &str = "10.96.0.40";

/// nginx in `pod`: exact `/admin` and everything under `/admin/` answer "admin", `/public/`
/// "public", the rest "other".
fn nginx(cluster: &Cluster, pod: &Pod) -> tokio::process::Child {
    let dir = cluster.dir.join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen {PORT};\n    location = /admin {{ return 200 \"admin\\n\"; }}\n    location /admin/ {{ return 200 \"admin\\n\"; }}\n    location /public/ {{ return 200 \"public\\n\"; }}\n    location / {{ return 200 \"other\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    pod.command("nginx")
        .unwrap()
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .spawn()
        .expect("nginx (cargo xtask test installs it)")
}

/// The bypass set: raw request targets, sent as they are.
const BYPASSES: &[&str] = &[
    "/admin",
    "/%61dmin",
    "/%61%64%6d%69%6e",
    "//admin",
    "///admin",
    "/./admin",
    "/a/../admin",
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/..;/admin",
    "/%2e%2e/admin",
    "/admin%2F..",
    "/admin%2f",
    "/public%2F..%2Fadmin",
    "/admin;x",
    "/admin%00",
    "/admin/",
    "/admin/x",
    "/public/..%5Cadmin",
];

async fn get(client: &Pod, target: &str, http2: bool, absolute: bool) -> (u16, String) {
    let url = format!("http://{WEB}{target}");
    let mut args = vec!["--path-as-is"];
    if http2 {
        args.push("--http2-prior-knowledge");
    }
    let absolute_target = format!("http://{WEB}{target}");
    if absolute {
        args.extend(["--request-target", &absolute_target]);
    }
    args.push(&url);
    let c = client.curl(&args).await.unwrap();
    (c.status, c.body.trim().to_string())
}

async fn attempt(cluster: &Cluster, client: &Pod, policy: &str, allowed: &[(&str, &str)]) {
    cluster
        .change_config("authz.yaml", Some(policy))
        .await
        .unwrap();
    for http2 in [false, true] {
        for (path, body) in allowed {
            let (status, got) = get(client, path, http2, false).await;
            assert_eq!(
                (status, got.as_str()),
                (200, *body),
                "control {path} (h2: {http2})"
            );
        }
        for target in BYPASSES {
            for absolute in [false, true] {
                if absolute && http2 {
                    continue;
                }
                let (status, body) = get(client, target, http2, absolute).await;
                assert!(
                    body != "admin",
                    "{target} reached /admin (h2: {http2}, absolute-form: {absolute}): {status} {body}\npolicy:\n{policy}"
                );
                assert!(
                    matches!(status, 400 | 403 | 200),
                    "{target}: {status} {body}"
                );
            }
        }
    }
}

#[tokio::test]
async fn no_form_of_a_path_walks_around_a_path_rule() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .config_stream()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let _nginx = nginx(&cluster, &server);
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    cluster
        .label_pods(&[&server], json!({"app": "web"}))
        .await
        .unwrap();
    let ns = &server.namespace;
    cluster
        .change_config(
            "services.yaml",
            Some(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  clusterIP: {WEB}\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: {PORT}}}]\n"
            )),
        )
        .await
        .unwrap();
    let policy = |action: &str, paths: &str| {
        format!(
            "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: paths, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: {action}\n  rules:\n  - to: [{{paths: [{paths}]}}]\n"
        )
    };
    // Without a policy, the server really serves /admin for the decoded forms.
    let (status, body) = get(&client, "/%61dmin", false, false).await;
    assert_eq!((status, body.as_str()), (200, "admin"));

    attempt(
        &cluster,
        &client,
        &policy("DENY", "\"/admin*\""),
        &[("/public/x", "public"), ("/other", "other")],
    )
    .await;
    attempt(
        &cluster,
        &client,
        &policy("DENY", "\"/admin\", \"/admin/*\""),
        &[("/public/x", "public"), ("/administrator", "other")],
    )
    .await;
    attempt(
        &cluster,
        &client,
        &policy("ALLOW", "\"/public/*\""),
        &[("/public/x", "public"), ("/public/a/../b", "public")],
    )
    .await;
}
