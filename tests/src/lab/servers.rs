//! Real servers from Debian's packages, started on the windows side of a lab.

use std::{path::Path, process::Command, time::Duration};

use super::{Lab, Role, WIN_IP};

const WAIT: Duration = Duration::from_secs(60);

impl Lab {
    /// PostgreSQL on `WIN_IP:port` with trust authentication, data in the lab directory.
    pub fn start_postgres(&mut self, port: u16) -> usize {
        // Clients arrive from the agent's address (the Windows host), not from loopback.
        let (bin, data) = postgres_data(self.dir(), &format!("{WIN_IP}/32"));
        let data = data.display().to_string();
        let port = port.to_string();
        let listen = format!("listen_addresses={WIN_IP}");
        let postgres = format!("{bin}/postgres");
        let index = self.spawn_program(
            Role::Win,
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &postgres,
                "-D",
                &data,
                "-p",
                &port,
                "-k",
                &data,
                "-c",
                &listen,
                "-c",
                "fsync=off",
            ],
        );
        self.process(index).wait_line("ready to accept connections", WAIT);
        index
    }

    /// Redis on `WIN_IP:port`, no persistence.
    pub fn start_redis(&mut self, port: u16) -> usize {
        let (ip, port) = (WIN_IP.to_string(), port.to_string());
        let index = self.spawn_program(
            Role::Win,
            "redis-server",
            &["--bind", &ip, "--port", &port, "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        );
        self.process(index).wait_line("Ready to accept connections", WAIT);
        index
    }

    /// An HTTP server (Python's) on `WIN_IP:port` serving `dir`.
    pub fn start_http(&mut self, port: u16, dir: &Path) -> usize {
        let (ip, port, dir) = (WIN_IP.to_string(), port.to_string(), dir.display().to_string());
        let index = self.spawn_program(
            Role::Win,
            "python3",
            &["-u", "-m", "http.server", &port, "--bind", &ip, "--directory", &dir],
        );
        self.process(index).wait_line("Serving HTTP", WAIT);
        index
    }

    /// nginx in `role` on `ip:port`, answering every request with `body` and a line break.
    pub fn start_nginx(&mut self, role: Role, ip: std::net::Ipv4Addr, port: u16, body: &str) -> usize {
        let dir = self.dir().join(format!("nginx-{ip}-{port}"));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  default_type text/plain;\n  \
             server {{\n    listen {ip}:{port};\n    location / {{ return 200 \"{body}\\n\"; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        let (dir, path) = (dir.display().to_string(), path.display().to_string());
        let index = self.spawn_program(role, "nginx", &["-e", "stderr", "-p", &dir, "-c", &path]);
        let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
        let deadline = std::time::Instant::now() + WAIT;
        while !self.ns(role).output("bash", &["-c", &probe]).status.success() {
            assert!(std::time::Instant::now() < deadline, "nginx on {ip}:{port} never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        index
    }

    /// An iperf3 server on `WIN_IP:port`.
    pub fn start_iperf3(&mut self, port: u16) -> usize {
        let (ip, port) = (WIN_IP.to_string(), port.to_string());
        let index = self.spawn_program(Role::Win, "iperf3", &["-s", "-B", &ip, "-p", &port, "--forceflush"]);
        self.process(index).wait_line("Server listening", WAIT);
        index
    }
}

/// A PostgreSQL data directory `pg` under `dir`, made by initdb as the `postgres` user, trusting
/// clients from `trusted` (a CIDR). Returns the server's bin directory and the data directory.
pub fn postgres_data(dir: &Path, trusted: &str) -> (String, std::path::PathBuf) {
    let bin = postgres_bin_dir();
    let data = dir.join("pg");
    std::fs::create_dir_all(&data).expect("pg dir");
    open_to_others(dir);
    chown_postgres(&data);
    let init = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{bin}/initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .expect("initdb");
    assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
    let hba = data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    rules.push_str(&format!("host all all {trusted} trust\n"));
    std::fs::write(&hba, rules).expect("pg_hba.conf");
    (bin, data)
}

fn postgres_bin_dir() -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server installed under /usr/lib/postgresql (scripts/install-deps.sh)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL server binary").display().to_string()
}

/// Lets the `postgres` user walk into the lab directory.
fn open_to_others(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

fn chown_postgres(dir: &Path) {
    let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status().expect("chown");
    assert!(status.success());
}
