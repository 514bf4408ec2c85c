//! The real kube-apiserver of `DIFF_KUBECONFIG` for the kubectl tests (the real lane,
//! `scripts/test-real.sh`, sets it to an admin kubeconfig of `scripts/control-plane.sh`).

use std::path::PathBuf;
use std::process::Command;

/// A copy of the real server's kubeconfig whose context namespace is a fresh namespace of
/// this test, deleted (with the file) on drop.
pub(crate) struct RealServer {
    pub(crate) kubeconfig: PathBuf,
    pub(crate) ns: String,
}

fn run(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string()))
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

fn ok(kubeconfig: &std::path::Path, args: &[&str]) {
    let out = run(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl RealServer {
    /// `None` without `DIFF_KUBECONFIG`; `tag` names the test (unique among them).
    pub(crate) fn from_env(tag: &str) -> Option<Self> {
        let source = std::env::var("DIFF_KUBECONFIG").ok()?;
        let ns = format!("{tag}-{}", std::process::id());
        let kubeconfig = std::env::temp_dir().join(format!("kube-emulator-{ns}.kubeconfig"));
        std::fs::copy(&source, &kubeconfig).expect("copy DIFF_KUBECONFIG");
        let real = Self { kubeconfig, ns };
        ok(&real.kubeconfig, &["create", "namespace", &real.ns]);
        ok(
            &real.kubeconfig,
            &[
                "config",
                "set-context",
                "--current",
                "--namespace",
                &real.ns,
            ],
        );
        // ServiceAccount admission refuses pods until the controller made `default`.
        ok(
            &real.kubeconfig,
            &[
                "wait",
                "--for=create",
                "--timeout=60s",
                "serviceaccount/default",
            ],
        );
        Some(real)
    }

    /// A kube-rs client for the real server.
    #[allow(dead_code, reason = "used by the tests that watch with kube-rs")]
    pub(crate) async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        let _ = run(
            &self.kubeconfig,
            &["delete", "namespace", &self.ns, "--wait=false"],
        );
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
