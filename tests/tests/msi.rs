//! The Windows Installer package (`scripts/msi.sh`, msitools on Linux): its tables, read back with
//! `msiinfo`, must do what `sallyport-agent service install` does (the plan in
//! `agent/src/service`), and every command its custom actions run must be one the agent accepts.
//! The package is built around a stand-in file: the tables do not depend on the program's bytes,
//! and `./scripts/windows.sh msi` packages the real .exe with the same script.

use std::{collections::HashMap, path::Path, process::Command};

use sallyport_agent::service;
use sallyport_tests::process::binary;

/// The package's custom actions, each running the installed program.
const CUSTOM_ACTIONS: [&str; 5] = [
    "SallyportPrepare",
    "SallyportPrepareTakeOver",
    "SallyportEnroll",
    "SallyportStart",
    "SallyportRemoveData",
];

/// One table: its rows, each a map from column name to value.
struct Table(Vec<HashMap<String, String>>);

impl Table {
    fn read(msi: &Path, name: &str) -> Table {
        let out = Command::new("msiinfo").arg("export").arg(msi).arg(name).output().expect("run msiinfo");
        assert!(out.status.success(), "msiinfo export {name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
        let columns: Vec<String> = lines.next().expect("header").split('\t').map(str::to_owned).collect();
        // The column types and the table's keys come next.
        let rows = lines
            .skip(2)
            .filter(|l| !l.is_empty())
            .map(|l| columns.iter().cloned().zip(l.split('\t').map(str::to_owned)).collect())
            .collect();
        Table(rows)
    }

    fn row(&self, column: &str, value: &str) -> &HashMap<String, String> {
        self.0
            .iter()
            .find(|r| r.get(column).map(String::as_str) == Some(value))
            .unwrap_or_else(|| panic!("no row with {column} = {value}"))
    }
}

fn build_msi(dir: &Path) -> std::path::PathBuf {
    let exe = dir.join("sallyport-agent.exe");
    std::fs::write(&exe, b"MZ stand-in").expect("write");
    let msi = dir.join("sallyport-agent.msi");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/msi.sh");
    let out = Command::new("bash").arg(script).arg(&exe).arg(&msi).output().expect("run scripts/msi.sh");
    assert!(
        out.status.success(),
        "scripts/msi.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    msi
}

/// The custom action's command line with the installer's properties filled in, split as Windows
/// splits it (double quotes group).
fn command_line(target: &str, data: &str) -> Vec<String> {
    let text =
        target.replace("[CommonAppDataFolder]", data).replace("[TOKENFILE]", &format!("{data}join.token"));
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

#[test]
fn the_msi_installs_what_service_install_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let msi = build_msi(dir.path());

    // The service: name, words, own process, automatic start, LocalSystem, the agent's own
    // command line with the config in ProgramData.
    let services = Table::read(&msi, "ServiceInstall");
    assert_eq!(services.0.len(), 1);
    let svc = services.row("Name", service::SERVICE_NAME);
    assert_eq!(svc["DisplayName"], service::DISPLAY_NAME);
    assert_eq!(svc["Description"], service::DESCRIPTION);
    assert_eq!(svc["ServiceType"], "16", "SERVICE_WIN32_OWN_PROCESS");
    assert_eq!(svc["StartType"], "2", "SERVICE_AUTO_START");
    assert_eq!(svc["ErrorControl"], "1", "SERVICE_ERROR_NORMAL");
    assert_eq!(svc["StartName"], "", "LocalSystem, as `service install` registers it");
    let config = service::config_path(Path::new("[CommonAppDataFolder]Sallyport"));
    let plan: Vec<String> =
        service::launch_arguments(&config).iter().map(|a| a.to_string_lossy().replace('/', "\\")).collect();
    assert_eq!(command_line(&svc["Arguments"], "[CommonAppDataFolder]"), plan);
    assert!(
        service::data_dir(Some("[CommonAppDataFolder]".into())).ends_with("Sallyport"),
        "the data folder the package names is the plan's"
    );

    // Delayed automatic start, and an exit with an error code counts as a failure.
    let config_rows = Table::read(&msi, "MsiServiceConfig");
    let by_type: HashMap<&str, &str> =
        config_rows.0.iter().map(|r| (r["ConfigType"].as_str(), r["Argument"].as_str())).collect();
    assert_eq!(by_type.get("3"), Some(&"1"), "SERVICE_CONFIG_DELAYED_AUTO_START_INFO");
    assert_eq!(by_type.get("4"), Some(&"1"), "SERVICE_CONFIG_FAILURE_ACTIONS_FLAG");
    assert!(config_rows.0.iter().all(|r| r["Name"] == service::SERVICE_NAME && r["Event"] == "1"));

    // Recovery: restart after each of the plan's delays; the count resets after the plan's period.
    let failure = Table::read(&msi, "MsiServiceConfigFailureActions");
    let actions = failure.row("Name", service::SERVICE_NAME);
    assert_eq!(actions["ResetPeriod"], service::FAILURE_RESET.as_secs().to_string());
    let restarts: Vec<&str> = service::RESTART_DELAYS.iter().map(|_| "1").collect();
    assert_eq!(actions["Actions"], restarts.join("[~]"), "SC_ACTION_RESTART each time");
    let delays: Vec<String> = service::RESTART_DELAYS.iter().map(|d| d.as_millis().to_string()).collect();
    assert_eq!(actions["DelayActions"], delays.join("[~]"));
    let sequence = Table::read(&msi, "InstallExecuteSequence");
    let at = |action: &str| -> i64 { sequence.row("Action", action)["Sequence"].parse().expect("number") };
    assert!(at("MsiConfigureServices") > at("InstallServices"), "the two tables above are applied");

    // Stopped on upgrade and uninstall, removed on uninstall; never started by the package itself
    // (an unconfigured service would fail the install).
    let control = Table::read(&msi, "ServiceControl");
    let event: u32 = control.row("Name", service::SERVICE_NAME)["Event"].parse().expect("number");
    assert_eq!(event & (0x02 | 0x20), 0x22, "stop on install and uninstall");
    assert_eq!(event & 0x80, 0x80, "delete on uninstall");
    assert_eq!(event & (0x01 | 0x10), 0, "no start from the table");

    // The Event Log source, as winlog2::register writes it.
    let registry = Table::read(&msi, "Registry");
    let key = format!(r"SYSTEM\CurrentControlSet\Services\EventLog\Application\{}", service::EVENT_SOURCE);
    let values: HashMap<&str, &str> = registry
        .0
        .iter()
        .filter(|r| r["Root"] == "2" && r["Key"].trim_end_matches('\\') == key)
        .map(|r| (r["Name"].as_str(), r["Value"].as_str()))
        .collect();
    assert_eq!(values.get("EventMessageFile"), Some(&"[#AgentExe]"));
    assert_eq!(values.get("TypesSupported"), Some(&"#7"));

    // The program in Program Files\Sallyport (64-bit), where only administrators write.
    let file = Table::read(&msi, "File");
    let exe = file.row("File", "AgentExe");
    assert!(exe["FileName"].ends_with("sallyport-agent.exe"), "{}", exe["FileName"]);
    assert!(file.row("File", "WslHelper")["FileName"].ends_with("sallyport-wsl-helper.sh"));
    let dirs = Table::read(&msi, "Directory");
    let install = dirs.row("Directory", "INSTALLDIR");
    assert_eq!(install["Directory_Parent"], "ProgramFiles64Folder");
    assert!(install["DefaultDir"].ends_with("Sallyport"));

    // The custom actions: deferred, as LocalSystem, failures fail the install.
    let actions = Table::read(&msi, "CustomAction");
    let deferred_system = 0x400 | 0x800;
    for name in CUSTOM_ACTIONS {
        let row = actions.row("Action", name);
        let kind: u32 = row["Type"].parse().expect("number");
        assert_eq!(kind & deferred_system, deferred_system, "{name} runs deferred, not impersonated");
        assert_eq!(kind & 0x40, 0, "{name}: a failure fails the install");
        assert_eq!(row["Source"], "AgentExe", "{name} runs the installed program");
    }
    // The folder is prepared (owner check, protected access) right after the program is in place
    // and before the enrollment writes the key; the token comes from a file, never a command line.
    let condition = |a: &str| sequence.row("Action", a)["Condition"].clone();
    assert!(at("InstallFiles") < at("SallyportPrepare"));
    assert!(
        at("SallyportPrepare") < at("SallyportEnroll")
            && at("SallyportPrepareTakeOver") < at("SallyportEnroll")
    );
    assert!(at("SallyportEnroll") < at("InstallServices"));
    assert!(at("SallyportStart") > at("MsiConfigureServices"));
    assert!(at("SallyportRemoveData") < at("RemoveFiles"), "the program is still there to run");
    assert_eq!(condition("SallyportPrepare"), "NOT REMOVE AND NOT TAKEOVER");
    assert_eq!(condition("SallyportPrepareTakeOver"), "NOT REMOVE AND TAKEOVER");
    assert_eq!(condition("SallyportEnroll"), "NOT REMOVE AND TOKENFILE");
    assert_eq!(
        condition("SallyportRemoveData"),
        r#"REMOVE~="ALL" AND REMOVEDATA"#,
        "data stays unless asked"
    );
    for prepare in ["SallyportPrepare", "SallyportPrepareTakeOver"] {
        let target = &actions.row("Action", prepare)["Target"];
        assert!(
            target.contains("--wsl-writer [UserSID]"),
            "the installing user writes the wsl folder: {target}"
        );
    }
    let enroll = &actions.row("Action", "SallyportEnroll")["Target"];
    assert!(enroll.contains("--token-file \"[TOKENFILE]\""), "{enroll}");
    let secure = Table::read(&msi, "Property");
    let secure = &secure.row("Property", "SecureCustomProperties")["Value"];
    for property in ["TOKENFILE", "TAKEOVER", "REMOVEDATA"] {
        assert!(
            secure.split(';').any(|p| p == property),
            "{property} reaches the deferred actions: {secure}"
        );
    }

    // Every command line is one the agent accepts: on Linux each gets past argument parsing and
    // stops where Windows would begin (or, for enroll, at the missing token file).
    let data = dir.path().join("pd");
    let data = format!("{}/", data.display());
    for name in CUSTOM_ACTIONS {
        let args = command_line(&actions.row("Action", name)["Target"], &data);
        let out = Command::new(binary("sallyport-agent")).args(&args).output().expect("run the agent");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            text.contains("exist on Windows only") || text.contains("cannot read the join token"),
            "{name}: sallyport-agent {args:?} does not parse: {text}"
        );
    }
}
