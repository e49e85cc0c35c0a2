//! The relay's command line as a user runs it.

use std::process::{Command, Output};

fn relay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sallyport-relay")).args(args).output().expect("run sallyport-relay")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn init_check_and_agent_add() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let out = relay(&["init", "--dir", d, "--san", "127.0.0.1", "--san", "relay.lan"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = relay(&["check", "--config", &format!("{d}/relay.toml")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("names 127.0.0.1, relay.lan"), "{}", text(&out));

    let again = relay(&["init", "--dir", d, "--san", "127.0.0.1"]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    let bundle = dir.path().join("winbox");
    let out = relay(&["agent", "add", "winbox", "--dir", d, "--out", bundle.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    let agent_toml = std::fs::read_to_string(bundle.join("agent.toml")).expect("agent.toml");
    assert!(agent_toml.contains("relays = [\"127.0.0.1:443\"]"), "{agent_toml}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join("agent.key")).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = relay(&["agent", "add", "Bad_Name", "--dir", d, "--out", bundle.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid name \"Bad_Name\""), "{}", text(&out));
}

#[test]
fn bad_config_stops_startup_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", d, "--san", "127.0.0.1"]).status.success());
    let path = dir.path().join("relay.toml");
    let good = std::fs::read_to_string(&path).expect("relay.toml");

    std::fs::write(&path, good.replace("agent = \"winbox\"", "agent = \"win box\"")).expect("write");
    let out = relay(&["serve", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("relay.toml: key `services.example.agent`: \"win box\" is not a valid name"), "{t}");

    // Fail closed: no service, no agent, no start.
    let no_services = good.split("[services.example]").next().expect("head").to_owned();
    std::fs::write(&path, no_services).expect("write");
    let out = relay(&["serve", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("key `services`: no service is defined"), "{}", text(&out));

    // Fail closed: no CA, no start.
    std::fs::write(&path, &good).expect("write");
    std::fs::remove_file(dir.path().join("ca.crt")).expect("remove CA");
    let out = relay(&["serve", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("ca.crt: cannot read"), "{}", text(&out));
}
