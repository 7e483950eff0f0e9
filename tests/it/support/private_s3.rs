//! A private s3s-fs server a test can stop and start again (same port, same
//! data): the store really goes away, without disturbing the shared servers.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::harness::wait_for;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A private s3s-fs server that the test can stop and start again (on the
/// same port, with the same data), to take the store away from offsite.
pub struct PrivateS3 {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
}

impl PrivateS3 {
    pub fn start(dir: &Path) -> PrivateS3 {
        let data = dir.join("s3data");
        std::fs::create_dir_all(data.join("bucket")).unwrap();
        let port = free_port();
        let mut s = PrivateS3 {
            child: None,
            port,
            data,
        };
        s.resume();
        s
    }

    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://bucket/{prefix}?endpoint=http://127.0.0.1:{}&region=garage&force-path-style=true",
            self.port
        )
    }

    pub fn resume(&mut self) {
        let bin = std::env::var("OFFSITE_TEST_S3S_BIN")
            .expect("OFFSITE_TEST_S3S_BIN (run scripts/test-servers.sh start and source its env)");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--access-key")
            .arg(std::env::var("AWS_ACCESS_KEY_ID").unwrap())
            .arg("--secret-key")
            .arg(std::env::var("AWS_SECRET_ACCESS_KEY").unwrap())
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("the private S3 server", Duration::from_secs(20), || {
            TcpStream::connect(&addr).is_ok()
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.stop();
    }
}
