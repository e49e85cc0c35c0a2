// The agent's Event Log events: stable IDs, documented in docs/windows.md. A log event that carries an
// `event_id` field is written to the Windows Event Log under that ID (the service's log layer);
// other warnings and errors go there under the general IDs. This file is also included by the
// agent's build script, which builds the message table the Event Viewer shows them with: plain
// items only, no imports.

/// The IDs, as the Event Viewer shows them (the low 16 bits of the full message ID).
pub mod id {
    /// The tunnel to a relay is up.
    pub const TUNNEL_UP: u16 = 1000;
    /// The tunnel to a relay was lost; the agent reconnects.
    pub const TUNNEL_DOWN: u16 = 1001;
    /// The agent enrolled with a join token: a new identity.
    pub const ENROLLED: u16 = 1100;
    /// The agent's certificate was renewed.
    pub const CERTIFICATE_RENEWED: u16 = 1101;
    /// The certificate could not be renewed (it is retried).
    pub const RENEWAL_FAILED: u16 = 1102;
    /// A declared container did not start.
    pub const CONTAINER_START_FAILED: u16 = 1200;
    /// The service refused to start: its files can be changed by others than SYSTEM and
    /// Administrators (the event says which and how to fix it).
    pub const FILES_NOT_PRIVATE: u16 = 1300;
    /// The service could not start the agent (config or identity unusable).
    pub const START_FAILED: u16 = 1301;
    /// Any other error, warning or notice.
    pub const ERROR: u16 = 1;
    pub const WARNING: u16 = 2;
    pub const INFORMATION: u16 = 3;
}

/// How an event is shown: its Event Log type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Information,
    Warning,
    Error,
}

/// Every event: ID, severity, and what it means (docs/windows.md's table says the same).
pub const EVENTS: [(u16, Severity, &str); 11] = [
    (id::TUNNEL_UP, Severity::Information, "tunnel up"),
    (id::TUNNEL_DOWN, Severity::Warning, "tunnel lost"),
    (id::ENROLLED, Severity::Information, "enrolled"),
    (id::CERTIFICATE_RENEWED, Severity::Information, "certificate renewed"),
    (id::RENEWAL_FAILED, Severity::Warning, "certificate renewal failed"),
    (id::CONTAINER_START_FAILED, Severity::Error, "container did not start"),
    (id::FILES_NOT_PRIVATE, Severity::Error, "refused to start: files not private"),
    (id::START_FAILED, Severity::Error, "cannot start the agent"),
    (id::ERROR, Severity::Error, "error"),
    (id::WARNING, Severity::Warning, "warning"),
    (id::INFORMATION, Severity::Information, "information"),
];

/// The full message ID of an event: its severity in the top two bits (as the message compiler
/// sets them), its number below.
pub fn message_id(id: u16, severity: Severity) -> u32 {
    let bits: u32 = match severity {
        Severity::Information => 1,
        Severity::Warning => 2,
        Severity::Error => 3,
    };
    (bits << 30) | u32::from(id)
}

/// The severity an ID is declared with (`None`: not one of [`EVENTS`]).
pub fn severity_of(id: u16) -> Option<Severity> {
    EVENTS.iter().find(|(i, _, _)| *i == id).map(|(_, s, _)| *s)
}

/// The message table resource (the binary form of a message-compiler `.bin`): every event's text
/// is "%1", the words the agent logs. One block per event; text in UTF-16, NUL-ended, padded to
/// four bytes.
pub fn message_table() -> Vec<u8> {
    let mut ids: Vec<u32> = EVENTS.iter().map(|(id, sev, _)| message_id(*id, *sev)).collect();
    ids.sort_unstable();
    let mut entry: Vec<u8> = Vec::new();
    let text: Vec<u16> = "%1\r\n\0".encode_utf16().collect();
    let mut body: Vec<u8> = text.iter().flat_map(|u| u.to_le_bytes()).collect();
    while (body.len() + 4) % 4 != 0 {
        body.push(0);
    }
    let length = (body.len() + 4) as u16;
    entry.extend_from_slice(&length.to_le_bytes());
    // Flags: 1 = the text is UTF-16.
    entry.extend_from_slice(&1u16.to_le_bytes());
    entry.extend_from_slice(&body);
    let blocks = ids.len() as u32;
    let header = 4 + 12 * blocks;
    let mut out = Vec::new();
    out.extend_from_slice(&blocks.to_le_bytes());
    for (n, id) in ids.iter().enumerate() {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(header + n as u32 * entry.len() as u32).to_le_bytes());
    }
    for _ in &ids {
        out.extend_from_slice(&entry);
    }
    out
}
