//! Test support: runs `mediamesh node` as a child process on loopback, the way users run it.

#![allow(dead_code)] // each test binary uses a different part of this module

use mediamesh::auth::{Grants, TokenKeys};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789abcdef";

pub struct TestNode {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    pub media_ports: (u16, u16),
    /// Loopback TURN port (unless the test passed its own `--turn`).
    pub turn_port: u16,
    pub relay_ports: (u16, u16),
    pub keys: TokenKeys,
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A block of `count` UDP ports below the ephemeral range that are free now. Tests of one
/// process run in parallel and their nodes bind lazily, so each call starts past the blocks
/// earlier calls handed out (probing alone would give two nodes the same block).
pub fn free_udp_range(count: u16) -> (u16, u16) {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let seed = (std::process::id() as u16 % 100) * 40;
    let offset = NEXT.fetch_add(count, std::sync::atomic::Ordering::Relaxed) % 4_000;
    for start in (20_000 + (seed + offset) % 8_000..29_000).step_by(usize::from(count)) {
        if (start..start + count).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
            return (start, start + count - 1);
        }
    }
    panic!("no free UDP range");
}

impl TestNode {
    pub fn start(extra: &[&str]) -> TestNode {
        let data_dir = std::env::temp_dir().join(format!("mediamesh-test-{}", uuid::Uuid::now_v7()));
        let http = free_tcp_port();
        let media_ports = free_udp_range(40);
        let mut args: Vec<String> = vec![
            "node".into(),
            "--node-id".into(),
            "test-1".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{http}"),
            "--grpc".into(),
            format!("127.0.0.1:{}", free_tcp_port()),
            "--cluster".into(),
            format!("127.0.0.1:{}", free_tcp_port()),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--media-ports".into(),
            format!("{}-{}", media_ports.0, media_ports.1),
            "--api-secret".into(),
            SECRET.into(),
        ];
        // Parallel tests must not all bind the default 0.0.0.0:3478.
        let relay_ports = free_udp_range(41);
        let turn_port = relay_ports.0;
        let relay_ports = (relay_ports.0 + 1, relay_ports.1);
        if !extra.contains(&"--turn") {
            args.extend(["--turn".into(), format!("127.0.0.1:{turn_port}")]);
        }
        if !extra.contains(&"--turn-relay-ports") {
            args.extend([
                "--turn-relay-ports".into(),
                format!("{}-{}", relay_ports.0, relay_ports.1),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_mediamesh"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mediamesh node");
        let node = TestNode {
            child,
            base: format!("http://127.0.0.1:{http}"),
            data_dir,
            media_ports,
            turn_port,
            relay_ports,
            keys: TokenKeys::new(SECRET),
        };
        node.wait_healthy(Duration::from_secs(20));
        node
    }

    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(response) = reqwest::blocking::get(format!("{}/readyz", self.base))
                && response.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node at {} not ready within {timeout:?}", self.base);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn token(&self, room: &str, grants: Grants) -> String {
        self.keys.create("tester", room, grants, Duration::from_secs(600))
    }

    pub fn publish_token(&self, room: &str) -> String {
        self.token(
            room,
            Grants {
                publish: true,
                ..Default::default()
            },
        )
    }

    pub fn subscribe_token(&self, room: &str) -> String {
        self.token(
            room,
            Grants {
                subscribe: true,
                ..Default::default()
            },
        )
    }

    pub fn admin_token(&self) -> String {
        self.token(
            "*",
            Grants {
                admin: true,
                ..Default::default()
            },
        )
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we spawned and SIGTERM; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A syntactically complete WebRTC offer (audio Opus + video VP8), as a browser sends it. The
/// node answers it; nothing ever connects.
pub fn sample_offer() -> String {
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:0123456789abcdefghijklmn",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=ssrc:1001 cname:test",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:0123456789abcdefghijklmn",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
        "a=setup:actpass",
        "a=mid:1",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:96 VP8/90000",
        "a=rtcp-fb:96 nack",
        "a=rtcp-fb:96 nack pli",
        "a=ssrc:1002 cname:test",
        "",
    ]
    .join("\r\n")
}
