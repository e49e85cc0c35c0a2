//! NTLM over HTTP with a real implementation on both ends (Python's pyspnego): a server that, as
//! IIS does, binds the authentication to its TCP connection (the challenge and the answer must
//! come on one connection, and the connection stays authenticated), and a client that runs the
//! three-message exchange on one keep-alive connection.

use std::{net::SocketAddr, process::Command};

use crate::{
    process::Spawned,
    servers::{free_port, wait_tcp, Server},
};

/// The domain, user and password the server knows.
pub const DOMAIN: &str = "HOMELAB";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "Winter2026!";

const SERVER: &str = r#"
import base64, os, sys, spnego
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, challenge=None):
        body = body.encode()
        self.send_response(status)
        if challenge is not None:
            self.send_header("WWW-Authenticate", ("NTLM " + challenge).strip())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # One handler per TCP connection: what it keeps is the connection's.
        user = getattr(self, "user", None)
        context = getattr(self, "context", None)
        port = self.client_address[1]
        header = self.headers.get("Authorization", "")
        if not header.startswith("NTLM "):
            if user:
                return self.answer(200, "hello %s on connection %d" % (user, port))
            return self.answer(401, "log in", "")
        token = base64.b64decode(header[5:])
        if context is None or context.complete:
            context = self.context = spnego.server(protocol="ntlm")
        try:
            out = context.step(token)
        except Exception as e:
            self.context = None
            return self.answer(401, "refused on connection %d: %s" % (port, type(e).__name__), "")
        if out is not None and not context.complete:
            return self.answer(401, "challenge", base64.b64encode(out).decode())
        self.user = context.client_principal
        self.answer(200, "hello %s on connection %d" % (self.user, port))

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

const CLIENT: &str = r#"
import base64, http.client, sys, spnego
host, port, name, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
connection = http.client.HTTPConnection(host, port, timeout=10)
def get(auth=None):
    headers = {"Host": name}
    if auth:
        headers["Authorization"] = "NTLM " + base64.b64encode(auth).decode()
    connection.request("GET", "/", headers=headers)
    response = connection.getresponse()
    body = response.read().decode()
    return response.status, response.getheader("WWW-Authenticate", ""), body
status, offer, body = get()
print(status, offer)
client = spnego.client(user, password, hostname=name, protocol="ntlm")
status, challenge, body = get(client.step())
print(status, challenge[:12])
if status != 401 or not challenge.startswith("NTLM "):
    sys.exit("no challenge: %d %s" % (status, body))
status, _, body = get(client.step(base64.b64decode(challenge[5:])))
print(status, body)
for _ in range(3):
    status, _, body = get()
    print(status, body)
"#;

/// The server on a free loopback port, knowing `DOMAIN\USER` with `PASSWORD`.
pub fn server() -> Server {
    let dir = tempfile::tempdir().expect("dir");
    let users = dir.path().join("users");
    std::fs::write(&users, format!("{DOMAIN}:{USER}:{PASSWORD}\n")).expect("user file");
    let port = free_port();
    let mut command = Command::new("python3");
    command.args(["-c", SERVER, &port.to_string()]).env("NTLM_USER_FILE", &users);
    let process = Spawned::start(command);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_tcp(addr, "NTLM server");
    Server::with_dir(process, addr, dir)
}

/// Runs the exchange through `relay` (an HTTP listener) for host `name` on one connection with
/// `password`, then three more requests on it; returns the status and body of each request, one
/// line each.
pub fn exchange(relay: SocketAddr, name: &str, password: &str) -> Result<Vec<String>, String> {
    let user = format!("{DOMAIN}\\{USER}");
    let out = Command::new("python3")
        .args(["-c", CLIENT, &relay.ip().to_string(), &relay.port().to_string(), name, &user, password])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}
