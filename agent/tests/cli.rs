//! The agent's command line as a user runs it.

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sallyport-agent")).args(args).output().expect("run sallyport-agent")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

const CONFIG: &str = r#"
[agent]
relays = ["127.0.0.1:4433"]
ca_cert = "ca.crt"
cert = "agent.crt"
key = "agent.key"

[services.web]
target = "tcp://127.0.0.1:8080"
"#;

#[test]
fn check_reports_the_first_problem_with_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let p = path.to_str().expect("utf-8");

    std::fs::write(&path, CONFIG.replace("tcp://127.0.0.1:8080", "tcp://127.0.0.1")).expect("write");
    let out = agent(&["check", "--config", p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("agent.toml: key `services.web.target`: \"tcp://127.0.0.1\": expected HOST:PORT"),
        "{}",
        text(&out)
    );

    // Without an identity there is no tunnel: `run` refuses to start, it does not run unauthenticated.
    std::fs::write(&path, CONFIG).expect("write");
    for command in ["check", "run"] {
        let out = agent(&[command, "--config", p]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out).contains("ca.crt: cannot read"), "{command}: {}", text(&out));
    }
}
