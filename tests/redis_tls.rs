//! Redis over TLS (`rediss://`) with a private CA: a real `redis-server` with a TLS port and
//! certificates made by `openssl` for this test.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use session_operator::store::{Entry, RedisOptions, RedisStore, Store, StoreOptions};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A CA and a server certificate for localhost / 127.0.0.1.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=session-operator test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_file() {
    let dir = std::env::temp_dir().join(common::unique("redis-tls"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    certificates(&dir);
    let port = free_port();
    let _server = Server(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir", "."])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("rediss://localhost:{port}");
    let options = |ca: Option<&str>| RedisOptions {
        prefix: "tls:".into(),
        ca_file: ca.map(|f| dir.join(f)),
        ..RedisOptions::default()
    };

    let store = RedisStore::connect(&url, StoreOptions::default(), options(Some("ca.crt")))
        .await
        .expect("TLS connection with the private CA");
    store
        .set("s1", &Entry::new("w1", ""))
        .await
        .expect("set over TLS");
    assert_eq!(
        store
            .get("s1")
            .await
            .expect("get")
            .map(|e| e.worker_id)
            .as_deref(),
        Some("w1")
    );

    // Without the CA the server's certificate is not trusted.
    let untrusted = RedisStore::connect(&url, StoreOptions::default(), options(None)).await;
    assert!(
        untrusted.is_err(),
        "a certificate from an unknown CA must be refused"
    );
    // A missing CA file is a clear configuration error.
    let Err(missing) =
        RedisStore::connect(&url, StoreOptions::default(), options(Some("nope.crt"))).await
    else {
        panic!("a missing CA file must be an error")
    };
    assert!(
        missing.to_string().contains("reading the Redis CA file"),
        "{missing}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
