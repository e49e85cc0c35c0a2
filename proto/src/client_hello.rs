//! Reading the server name a TLS client asks for from its ClientHello, without terminating TLS.
//!
//! The HTTPS listener peeks at the first TLS records, takes the name from the `server_name`
//! extension (RFC 6066, section 3), and forwards the same bytes untouched to the agent's target.
//! The ClientHello may span several records; they are joined until the handshake message is whole.

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a whole ClientHello yet: read more.
    Incomplete,
    /// A ClientHello naming this host (lower-cased).
    Name(String),
    /// A ClientHello without a host name.
    NoName,
    /// Not a TLS ClientHello at all, with what was wrong.
    NotTls(&'static str),
}

/// The largest ClientHello the listener waits for (larger ones are refused).
pub const MAX_HELLO: usize = 16 * 1024;

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;
const ALPN: u16 = 16;

/// Parses the start of a TLS connection.
pub fn parse(buf: &[u8]) -> Hello {
    HelloReader::default().advance(buf)
}

/// Reads a ClientHello as its bytes arrive, looking at each byte once: each call gets everything
/// read so far (the same bytes as before, and maybe more) and goes on where the last call stopped.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Bytes of whole records already taken.
    consumed: usize,
    /// The handshake records' payloads joined.
    handshake: Vec<u8>,
    /// The application protocols (ALPN) a whole ClientHello offers.
    alpn: Vec<Vec<u8>>,
}

impl HelloReader {
    /// What `buf` (all bytes read so far) says.
    pub fn advance(&mut self, buf: &[u8]) -> Hello {
        loop {
            let rest = buf.get(self.consumed..).unwrap_or_default();
            let [kind, major, _minor, hi, lo, ref body @ ..] = *rest else { return Hello::Incomplete };
            if kind != HANDSHAKE {
                return Hello::NotTls("a record before the ClientHello's end is not a handshake record");
            }
            if major != 3 {
                return Hello::NotTls("unknown record version");
            }
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            let Some(payload) = body.get(..len) else {
                // A record cut short: only its first byte can decide anything yet.
                let first = self.handshake.first().or(body.first());
                return check_partial(first.copied());
            };
            self.handshake.extend_from_slice(payload);
            self.consumed += 5 + len;
            // What the bytes so far already decide, as a prefix cut inside this record would.
            if let Hello::NotTls(why) = check_partial(self.handshake.first().copied()) {
                return Hello::NotTls(why);
            }
            if let [_, a, b, c, ..] = *self.handshake {
                let msg_len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if msg_len > MAX_HELLO {
                    return Hello::NotTls("ClientHello too large");
                }
                if self.handshake.len() >= 4 + msg_len {
                    let body = &self.handshake[4..4 + msg_len];
                    self.alpn = alpn_offered(body).unwrap_or_default();
                    return match client_hello(body) {
                        Some(Some(name)) => Hello::Name(name),
                        Some(None) => Hello::NoName,
                        None => Hello::NotTls("malformed ClientHello"),
                    };
                }
            }
        }
    }
}

impl HelloReader {
    /// Whether the whole ClientHello read offers the application protocol `protocol` (ALPN, RFC
    /// 7301): how a tunnel over TCP is told apart from a client of an HTTPS service.
    pub fn offers(&self, protocol: &[u8]) -> bool {
        self.alpn.iter().any(|p| p == protocol)
    }
}

/// The protocols of the `application_layer_protocol_negotiation` extension of a whole ClientHello
/// body: `None` if malformed.
fn alpn_offered(body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let Some(data) = extension(body, ALPN)? else { return Some(Vec::new()) };
    let mut list = Reader(data);
    let list_len = list.u16()?;
    let mut names = Reader(list.take(list_len.into())?);
    let mut protocols = Vec::new();
    while !names.0.is_empty() {
        let len = names.u8()?;
        protocols.push(names.take(len.into())?.to_vec());
    }
    Some(protocols)
}

/// The data of extension `wanted` in a whole ClientHello body: `None` if malformed, `Some(None)` if
/// absent.
fn extension(body: &[u8], wanted: u16) -> Option<Option<&[u8]>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session = r.u8()?;
    r.take(session.into())?;
    let suites = r.u16()?;
    r.take(suites.into())?;
    let compression = r.u8()?;
    r.take(compression.into())?;
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let ext_len = r.u16()?;
    let mut exts = Reader(r.take(ext_len.into())?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len.into())?;
        if kind == wanted {
            return Some(Some(data));
        }
    }
    Some(None)
}

/// Handshake bytes cut short, starting with `first`: still incomplete, unless that is already not
/// a ClientHello.
fn check_partial(first: Option<u8>) -> Hello {
    match first {
        Some(kind) if kind != CLIENT_HELLO => {
            Hello::NotTls("the first handshake message is not a ClientHello")
        }
        _ => Hello::Incomplete,
    }
}

/// The `server_name` host of a whole ClientHello body: `None` if malformed, `Some(None)` if absent.
fn client_hello(body: &[u8]) -> Option<Option<String>> {
    let Some(data) = extension(body, SERVER_NAME)? else { return Some(None) };
    let mut list = Reader(data);
    let list_len = list.u16()?;
    let mut names = Reader(list.take(list_len.into())?);
    while !names.0.is_empty() {
        let name_type = names.u8()?;
        let len = names.u16()?;
        let name = names.take(len.into())?;
        if name_type == HOST_NAME {
            let name = std::str::from_utf8(name).ok()?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
        }
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// A fatal `unrecognized_name` alert (TLS 1.2 record framing, which every client reads), sent to a
/// client asking for a name no service has, so it sees why instead of a bare close.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, split into records of `record` bytes.
    fn hello(name: Option<&str>, record: usize) -> Vec<u8> {
        hello_offering(name, record, &[])
    }

    fn hello_offering(name: Option<&str>, record: usize, alpn: &[&[u8]]) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.roots.clear();
        let config = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let mut config = std::sync::Arc::unwrap_or_clone(config);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let config = std::sync::Arc::new(config);
        let server = match name {
            Some(n) => rustls::pki_types::ServerName::try_from(n.to_owned()).expect("name"),
            None => rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        };
        let mut conn = rustls::ClientConnection::new(config, server).expect("client");
        conn.set_buffer_limit(None);
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        // Re-frame the handshake payload into smaller records.
        let payload = &out[5..];
        let mut framed = Vec::new();
        for chunk in payload.chunks(record) {
            framed.extend_from_slice(&[22, 3, 1]);
            framed.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            framed.extend_from_slice(chunk);
        }
        framed
    }

    #[test]
    fn name_is_found_in_one_or_many_records() {
        for record in [16_384, 100, 7] {
            let bytes = hello(Some("App.Home.LAN"), record);
            assert_eq!(parse(&bytes), Hello::Name("app.home.lan".into()), "records of {record}");
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Hello::Incomplete, "cut at {cut} of {}", bytes.len());
            }
        }
    }

    #[test]
    fn offered_protocols_are_read() {
        for record in [16_384, 50] {
            let bytes = hello_offering(Some("relay.home.lan"), record, &[b"h2", crate::ALPN_TUNNEL]);
            let mut reader = HelloReader::default();
            assert_eq!(reader.advance(&bytes), Hello::Name("relay.home.lan".into()));
            assert!(reader.offers(crate::ALPN_TUNNEL) && reader.offers(b"h2"), "records of {record}");
            assert!(!reader.offers(b"http/1.1"));
        }
        let mut reader = HelloReader::default();
        reader.advance(&hello(Some("app.home.lan"), 16_384));
        assert!(!reader.offers(crate::ALPN_TUNNEL), "no ALPN extension: nothing offered");
    }

    #[test]
    fn hello_without_name() {
        // Clients leave SNI out when connecting to an IP address.
        assert_eq!(parse(&hello(None, 16_384)), Hello::NoName);
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls(_)));
        assert!(matches!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Hello::NotTls(_)));
        assert!(matches!(parse(&[22, 9, 1, 0, 0]), Hello::NotTls(_)));
        assert!(matches!(parse(&[22, 3, 1, 0, 5, 1, 0xff, 0, 0, 0]), Hello::NotTls(_)));
        // A whole but truncated ClientHello body.
        assert!(matches!(parse(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]), Hello::NotTls(_)));
    }

    #[test]
    fn fed_a_byte_at_a_time_the_reader_gives_the_verdict_of_the_whole() {
        let many = hello(Some("db.home.lan"), 7);
        let inputs = [
            hello(Some("App.Home.lan"), 16_384),
            many.clone(),
            hello(None, 16_384),
            b"GET / HTTP/1.1".to_vec(),
        ];
        for input in inputs {
            let whole = parse(&input);
            let mut reader = HelloReader::default();
            let mut verdict = Hello::Incomplete;
            for end in 1..=input.len() {
                verdict = reader.advance(&input[..end]);
                if verdict != Hello::Incomplete {
                    break;
                }
            }
            assert_eq!(verdict, whole, "{input:?}");
        }
        // Each record is copied once: the joined payload is the message, not a square of it.
        let mut reader = HelloReader::default();
        for end in 1..=many.len() {
            reader.advance(&many[..end]);
        }
        assert!(reader.handshake.len() < many.len(), "{} of {}", reader.handshake.len(), many.len());
    }

    #[test]
    fn a_prefix_is_incomplete_or_already_the_verdict() {
        // Found by fuzzing: a first record too short to hold the message's length, then a record
        // that is not a handshake. The first byte already decides, cut or whole.
        let input = [0x16, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0x80, 0xd6, 1];
        let whole = parse(&input);
        assert_eq!(whole, Hello::NotTls("the first handshake message is not a ClientHello"));
        for cut in 0..input.len() {
            let part = parse(&input[..cut]);
            assert!(part == Hello::Incomplete || part == whole, "cut at {cut}: {part:?}");
        }
    }
}
