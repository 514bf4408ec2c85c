//! kubectl against the `kube-emulator` binary: the protocol as a Go client sees it. The same
//! scenario runs against the real kube-apiserver of `DIFF_KUBECONFIG` when it is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "support/real_kubectl.rs"]
mod real_kubectl;
use real_kubectl::RealServer;

/// The kubectl to run: `$KUBECTL` if set, else `kubectl` from `PATH`.
fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

/// Kills the emulator process if the test fails midway.
struct Server {
    child: Child,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kubectl_available() -> bool {
    Command::new(kubectl_bin())
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_binary() -> Server {
    let dir = std::env::temp_dir().join(format!("kube-emulator-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    let seed = dir.join("seed.yaml");
    std::fs::write(
        &seed,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: seeded}\n",
    )
    .expect("seed file");
    let child = Command::new(env!("CARGO_BIN_EXE_kube-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--bookmark-interval",
            "1",
            // A protocol test: pods are scripted, nothing acts on them.
            "--controllers",
            "none",
            "--load",
        ])
        .arg(&seed)
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn kube-emulator");
    let server = Server {
        child,
        kubeconfig,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.kubeconfig.exists() {
        assert!(
            Instant::now() < deadline,
            "kube-emulator did not write its kubeconfig"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(kubectl_bin());
    cmd.env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("run kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("kubectl output")
}

/// Runs kubectl and returns stdout, failing the test with stderr on error.
fn ok(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(kubeconfig, args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gizmos.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gizmos, singular: gizmo, kind: Gizmo, shortNames: [gz]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
"#;

const GIZMOS: &str = r#"
apiVersion: example.com/v1
kind: Gizmo
metadata: {name: g1, labels: {app: web}}
spec: {size: 3}
---
apiVersion: example.com/v1
kind: Gizmo
metadata: {name: g2, labels: {app: db}}
spec: {size: 4}
"#;

const EVENT: &str = r#"
apiVersion: v1
kind: Event
metadata: {name: web-started}
involvedObject: {kind: Pod, name: web, namespace: NAMESPACE}
reason: Started
message: Started container
type: Normal
"#;

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: nginx}]}
"#;

#[test]
fn kubectl_drives_the_binary() {
    if !kubectl_available() {
        // Skipping must be explicit: a missing kubectl is a broken test environment.
        assert!(
            std::env::var("KUBE_EMULATOR_SKIP_KUBECTL").as_deref() == Ok("1"),
            "kubectl ({}) is not installed; install it (scripts/test.sh does) or set \
             KUBE_EMULATOR_SKIP_KUBECTL=1 to skip this test",
            kubectl_bin()
        );
        eprintln!(
            "\n\n*** SKIPPED (KUBE_EMULATOR_SKIP_KUBECTL=1): the kubectl end-to-end test did not run ***\n\n"
        );
        return;
    }
    let server = start_binary();
    let kc = server.kubeconfig.as_path();
    // Objects from --load exist before the kubeconfig appears (an emulator-only flag).
    assert_eq!(
        ok(kc, &["get", "namespace", "seeded", "-o", "name"], None).trim(),
        "namespace/seeded"
    );
    scenario(kc, "default");
    if let Some(real) = RealServer::from_env("kubectl") {
        eprintln!("kubectl scenario on kube-apiserver (namespace {})", real.ns);
        scenario(&real.kubeconfig, &real.ns);
    }

    // SIGTERM shuts the binary down cleanly.
    let mut server = server;
    let pid = server.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = server.child.wait().expect("wait");
    assert!(exit.success(), "emulator exited with {exit:?}");
}

/// What kubectl does against either server: `kc`'s context namespace is `ns`.
fn scenario(kc: &Path, ns: &str) {
    let resources = ok(kc, &["api-resources"], None);
    assert!(
        resources.contains("pods") && resources.contains("leases"),
        "{resources}"
    );

    ok(kc, &["apply", "-f", "-"], Some(CRD));
    // A real server serves the resource a moment after the CRD is Established.
    ok(
        kc,
        &[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/gizmos.example.com",
        ],
        None,
    );
    ok(kc, &["apply", "-f", "-"], Some(GIZMOS));
    let json: serde_json::Value =
        serde_json::from_str(&ok(kc, &["get", "gizmos", "-o", "json"], None)).expect("json");
    let names: Vec<&str> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["g1", "g2"]);

    let selected = ok(kc, &["get", "gz", "-l", "app=web", "-o", "name"], None);
    assert_eq!(selected.trim(), "gizmo.example.com/g1");
    let selected = ok(
        kc,
        &["get", "gizmos", "-l", "app notin (web)", "-o", "name"],
        None,
    );
    assert_eq!(selected.trim(), "gizmo.example.com/g2");

    ok(kc, &["label", "gizmo", "g1", "tier=front"], None);
    ok(
        kc,
        &[
            "patch",
            "gizmo",
            "g1",
            "--type=merge",
            "-p",
            r#"{"spec":{"size":5}}"#,
        ],
        None,
    );
    let got = ok(
        kc,
        &[
            "get",
            "gizmo",
            "g1",
            "-o",
            "jsonpath={.spec.size} {.metadata.labels.tier}",
        ],
        None,
    );
    assert_eq!(got, "5 front");

    // Server-side schema validation reaches kubectl as a 422 with the field path.
    let out = kubectl(
        kc,
        &[
            "patch",
            "gizmo",
            "g1",
            "--type=merge",
            "-p",
            r#"{"spec":{"size":50}}"#,
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.size"));

    // `get -w` observes a change made after it started.
    let mut watch = Command::new(kubectl_bin())
        .env("KUBECONFIG", kc)
        .args([
            "get",
            "gizmo",
            "g2",
            "-w",
            "-o",
            "jsonpath={.spec.size}{\"\\n\"}",
            "--request-timeout=60s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("initial state from get -w");
    assert_eq!(first, "4");
    ok(
        kc,
        &[
            "patch",
            "gizmo",
            "g2",
            "--type=merge",
            "-p",
            r#"{"spec":{"size":9}}"#,
        ],
        None,
    );
    let changed = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("change observed by get -w");
    assert_eq!(changed, "9");
    let _ = watch.kill();
    let _ = watch.wait();

    // Built-in pods: strategic merge patch, graceful delete.
    ok(
        kc,
        // No scheduler binds it (a real cluster's would, and kwok would start it).
        &[
            "run",
            "web",
            "--image=nginx",
            "--labels=app=web",
            r#"--overrides={"spec":{"schedulerName":"no-scheduler"}}"#,
        ],
        None,
    );
    ok(
        kc,
        &[
            "patch",
            "pod",
            "web",
            "-p",
            r#"{"metadata":{"labels":{"extra":"yes"}}}"#,
        ],
        None,
    );
    assert_eq!(
        ok(kc, &["get", "pods", "-l", "extra=yes", "-o", "name"], None).trim(),
        "pod/web"
    );
    // Human-readable output comes from server-side Tables.
    let table = ok(kc, &["get", "pods"], None);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{table}"
    );
    assert!(
        table.contains("web") && table.contains("0/1") && table.contains("Pending"),
        "{table}"
    );
    ok(kc, &["delete", "pod", "web", "--grace-period=1"], None);
    assert_eq!(ok(kc, &["get", "pods", "-o", "name"], None).trim(), "");

    // Events print with kubectl's familiar columns.
    ok(
        kc,
        &["apply", "-f", "-"],
        Some(&EVENT.replace("NAMESPACE", ns)),
    );
    let events = ok(kc, &["get", "events"], None);
    assert!(
        events.starts_with("LAST SEEN") && events.contains("pod/web") && events.contains("Started"),
        "{events}"
    );

    // Server-side apply and the scale subresource on a built-in kind.
    ok(kc, &["apply", "--server-side", "-f", "-"], Some(DEPLOYMENT));
    ok(kc, &["scale", "deployment", "web", "--replicas=4"], None);
    assert_eq!(
        ok(
            kc,
            &[
                "get",
                "deployment",
                "web",
                "-o",
                "jsonpath={.spec.replicas}"
            ],
            None
        ),
        "4"
    );
    ok(kc, &["delete", "deployment", "web"], None);

    ok(kc, &["delete", "gizmo", "g1"], None);
    assert_eq!(
        ok(kc, &["get", "gizmos", "-o", "name"], None).trim(),
        "gizmo.example.com/g2"
    );
    ok(kc, &["delete", "-f", "-"], Some(CRD));
    let out = kubectl(kc, &["get", "gizmos"], None);
    assert!(
        !out.status.success(),
        "gizmos are no longer served after the CRD is deleted"
    );
}
