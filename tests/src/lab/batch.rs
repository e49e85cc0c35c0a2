//! The transfer batches the lab tests run through a tunnel: the transfer service's port and
//! spec, a batch started in the background, and a process's output as one text.

use std::time::Duration;

use super::{Lab, LabTunnel, TunnelSpec, RELAY_IP};

/// The transfer server's port, on both sides of the tunnel.
pub const TRANSFER_PORT: u16 = 9000;

/// A tunnel carrying the transfer service.
pub fn transfer_spec() -> TunnelSpec {
    TunnelSpec::new(&[("transfer", TRANSFER_PORT, TRANSFER_PORT)])
}

impl Lab {
    /// Starts the transfer server and a tunnel from `spec` (default timers), then a background
    /// batch of `count` transfers of `min..=max` bytes; returns once bytes are flowing.
    pub fn transfers_in_flight(
        &mut self,
        spec: TunnelSpec,
        count: &str,
        min: &str,
        max: &str,
    ) -> (LabTunnel, usize) {
        self.start_transfer_server(TRANSFER_PORT);
        let tunnel = self.start_tunnel(&spec);
        let args = ["--count", count, "--min", min, "--max", max, "--timeout", "60s"];
        let batch = self.spawn_transfers(RELAY_IP, TRANSFER_PORT, &args);
        self.process(batch).wait_line("flowing", Duration::from_secs(30));
        (tunnel, batch)
    }
}

/// A process's standard output and error, as one text.
pub fn output_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
