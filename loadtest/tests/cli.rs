//! Bad input to the tool itself: every mistake is a clear message and a
//! non-zero exit, quickly, never a hang. No server is needed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the tool; fails the test if it takes longer than `limit`.
fn run(args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcall-loadtest"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fleetcall-loadtest");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("fleetcall-loadtest {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), out, err)
}

const QUICK: Duration = Duration::from_secs(10);

#[test]
fn unknown_flags_are_usage_errors() {
    let (code, _, err) = run(&["--rooms", "2", "--frobnicate"], QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--frobnicate"), "{err}");
    let (code, _, err) = run(&["--rooms", "many"], QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("many"), "{err}");
    let (code, _, err) = run(&["--rooms", "1", "--duration", "soon"], QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("soon"), "{err}");
}

#[test]
fn impossible_scenarios_are_refused_before_anything_starts() {
    for (args, needle) in [
        (&["--duration", "5"][..], "nothing to run"),
        (&["--rooms", "2", "--per-room", "1"][..], "at least 2"),
        (
            &["--rooms", "2", "--per-room", "3", "--talkers", "5"][..],
            "more than",
        ),
        (
            &["--rooms", "2", "--per-room", "50", "--control", "quic"][..],
            "at most 32",
        ),
        (
            &[
                "--rooms",
                "2",
                "--per-room",
                "3",
                "--fault",
                "server-restart@2",
            ][..],
            "--spawn",
        ),
        (
            &["--rooms", "2", "--per-room", "3", "--fault", "kill:9@2"][..],
            "9 devices",
        ),
        (
            &[
                "--rooms",
                "2",
                "--per-room",
                "3",
                "--fault",
                "media-drop:1@2",
            ][..],
            "needs a duration",
        ),
        (
            &["--rooms", "2", "--per-room", "3", "--fault", "explode@2"][..],
            "unknown kind",
        ),
        (
            &[
                "--rooms",
                "2",
                "--per-room",
                "3",
                "--duration",
                "5",
                "--fault",
                "kill@9",
            ][..],
            "before --duration",
        ),
        (
            &["--rooms", "2", "--per-room", "3", "--slo", "speed=9"][..],
            "unknown key",
        ),
        (
            &["--rooms", "2", "--per-room", "3", "--compare"][..],
            "--janus",
        ),
        (&["--idle", "100000000"][..], "open files"),
    ] {
        let (code, _, err) = run(args, QUICK);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
    }
}

#[test]
fn a_bad_scenario_file_names_the_problem() {
    let dir = std::env::temp_dir().join(format!("fleetcall-loadtest-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[rooms]\ncuont = 3\n").unwrap();
    let (code, _, err) = run(&["--scenario", typo.to_str().unwrap()], QUICK);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cuont") && err.contains("typo.toml"), "{err}");
    let (code, _, err) = run(
        &["--scenario", dir.join("missing.toml").to_str().unwrap()],
        QUICK,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreachable_server_is_an_error_not_a_hang() {
    // Nothing listens on port 1.
    let (code, _, err) = run(
        &[
            "--http",
            "http://127.0.0.1:1",
            "--quic",
            "127.0.0.1:1",
            "--rooms",
            "1",
            "--per-room",
            "2",
            "--quiet",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not reachable"), "{err}");
    // A server address that swallows packets (TEST-NET, RFC 5737): the
    // health check times out instead of hanging.
    let (code, _, err) = run(
        &[
            "--http",
            "http://192.0.2.1:8080",
            "--rooms",
            "1",
            "--per-room",
            "2",
            "--quiet",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not reachable"), "{err}");
    // A reachable HTTP port with the wrong data dir: no admin token.
    let missing = std::env::temp_dir().join("fleetcall-loadtest-no-such-dir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write;
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
            );
        }
    });
    let (code, _, err) = run(
        &[
            "--http",
            &format!("http://127.0.0.1:{port}"),
            "--data-dir",
            missing.to_str().unwrap(),
            "--rooms",
            "1",
            "--per-room",
            "2",
            "--quiet",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("admin token"), "{err}");
}

#[test]
fn a_missing_server_binary_is_an_error() {
    let (code, _, err) = run(
        &[
            "--spawn",
            "/nonexistent/fleetcall",
            "--rooms",
            "1",
            "--per-room",
            "2",
            "--quiet",
        ],
        QUICK,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/fleetcall"), "{err}");
}

#[test]
fn help_and_the_generated_clip() {
    let (code, out, _) = run(&["--help"], QUICK);
    assert_eq!(code, 0);
    assert!(
        out.contains("--per-room") && out.contains("Exit codes"),
        "{out}"
    );
    let path = std::env::temp_dir().join(format!(
        "fleetcall-loadtest-clip-{}.wav",
        std::process::id()
    ));
    let (code, _, err) = run(&["--write-wav", path.to_str().unwrap()], QUICK);
    assert_eq!(code, 0, "{err}");
    let reader = hound::WavReader::open(&path).unwrap();
    assert_eq!(
        (reader.spec().sample_rate, reader.spec().channels),
        (48_000, 1)
    );
    assert_eq!(reader.duration(), 8 * 48_000);
    let _ = std::fs::remove_file(path);
}
