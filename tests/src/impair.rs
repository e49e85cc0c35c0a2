//! A userspace UDP impairment proxy, for a kernel without `netem`: one-way delay, jitter, loss,
//! reordering, duplication and a rate limit, each direction on its own, deterministic with a seed.
//!
//! [`Shaper`] decides each packet's fate (pure, no IO); [`run`] is the proxy: it listens on one
//! socket, opens one upstream socket per client address, and sends every packet through a delay
//! line per direction.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{net::UdpSocket, sync::mpsc, time::Instant};

/// What the path does to packets, per direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// One-way delay (a round trip through the proxy takes twice this).
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ± this.
    pub jitter: Duration,
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// Probability that a packet is held back behind the ones after it.
    pub reorder: f64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Bits per second of the link, if limited; the queue holds at most [`MAX_QUEUE_DELAY`].
    pub rate_bps: Option<u64>,
    pub seed: u64,
}

/// A rate-limited link drops packets that would wait longer than this in its queue.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(200);

/// Decides, for one direction, when each packet leaves (never, once or twice).
#[derive(Debug)]
pub struct Shaper {
    imp: Impairment,
    rng: fastrand::Rng,
    link_free: Option<Instant>,
}

impl Shaper {
    pub fn new(imp: Impairment) -> Self {
        let rng = fastrand::Rng::with_seed(imp.seed);
        Self { imp, rng, link_free: None }
    }

    /// The departure times of a packet of `len` bytes arriving at `now`: empty when dropped.
    pub fn schedule(&mut self, now: Instant, len: usize) -> Vec<Instant> {
        // Draw every random number for every packet, so a decision never shifts the ones after it.
        let (lost, held, doubled) = (self.rng.f64(), self.rng.f64(), self.rng.f64());
        let jitter = self.rng.f64() * 2.0 - 1.0;
        let mut departure = now;
        if let Some(rate) = self.imp.rate_bps.filter(|r| *r > 0) {
            let start = self.link_free.map_or(now, |free| free.max(now));
            if start.saturating_duration_since(now) > MAX_QUEUE_DELAY {
                return Vec::new();
            }
            let serialization = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            self.link_free = Some(start + serialization);
            departure = start + serialization;
        }
        if lost < self.imp.loss {
            return Vec::new();
        }
        let mut delay = self.imp.delay.as_secs_f64() + jitter * self.imp.jitter.as_secs_f64();
        if held < self.imp.reorder {
            delay += self.imp.delay.as_secs_f64().max(0.002);
        }
        departure += Duration::from_secs_f64(delay.max(0.0));
        if doubled < self.imp.duplicate {
            vec![departure, departure + Duration::from_micros(100)]
        } else {
            vec![departure]
        }
    }
}

/// Packet counts of a running proxy.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "received {} sent {} dropped {}",
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed)
        )
    }
}

/// Where a delayed packet goes.
#[derive(Debug, Clone)]
enum Sink {
    /// Toward the upstream, on the client's own upstream socket.
    Up(Arc<UdpSocket>),
    /// Back to a client, from the listening socket.
    Down(Arc<UdpSocket>, SocketAddr),
}

struct Item {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    sink: Sink,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Packets held at once, at most, per direction.
const MAX_HELD: usize = 100_000;

/// Sends packets at their departure times.
async fn delay_line(mut rx: mpsc::UnboundedReceiver<Item>, stats: Arc<Stats>) {
    let mut heap: BinaryHeap<Reverse<Item>> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|Reverse(item)| item.at);
        tokio::select! {
            item = rx.recv() => match item {
                Some(item) if heap.len() < MAX_HELD => heap.push(Reverse(item)),
                Some(_) => { stats.dropped.fetch_add(1, Ordering::Relaxed); }
                None => return,
            },
            () = sleep_until(next) => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse(item)| item.at <= now) {
                    let Some(Reverse(item)) = heap.pop() else { break };
                    let sent = match &item.sink {
                        Sink::Up(socket) => socket.send(&item.data).await,
                        Sink::Down(socket, to) => socket.send_to(&item.data, to).await,
                    };
                    if sent.is_ok() {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until_precise(at).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at` to within tens of microseconds. Tokio's timer rounds every deadline up to the
/// next millisecond, which would lengthen each delayed packet by up to a millisecond (a 20 ms path
/// measuring 21 ms); the last two milliseconds are slept on this worker thread instead (the
/// multi-threaded runtime moves its other tasks away meanwhile), or, on a single-threaded runtime,
/// spent yielding so that the other tasks keep running.
pub async fn sleep_until_precise(at: Instant) {
    const COARSE: Duration = Duration::from_millis(2);
    if at > Instant::now() + COARSE {
        tokio::time::sleep_until(at - COARSE).await;
    }
    let rest = at.saturating_duration_since(Instant::now());
    if rest.is_zero() {
        return;
    }
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| std::thread::sleep(rest));
    } else {
        while Instant::now() < at {
            tokio::task::yield_now().await;
        }
    }
}

/// Runs the proxy: packets from clients on `listen` go to `upstream` and back, impaired by `up`
/// and `down`. Returns only on a socket error.
pub async fn run(
    listen: UdpSocket,
    upstream: SocketAddr,
    up: Impairment,
    down: Impairment,
    stats: Arc<Stats>,
) -> std::io::Result<()> {
    let listen = Arc::new(listen);
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    tokio::spawn(delay_line(up_rx, stats.clone()));
    tokio::spawn(delay_line(down_rx, stats.clone()));
    let mut up_shaper = Shaper::new(up);
    let down_shaper = Arc::new(Mutex::new(Shaper::new(down)));
    let seq = Arc::new(AtomicU64::new(0));
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = listen.recv_from(&mut buf).await?;
        stats.received.fetch_add(1, Ordering::Relaxed);
        let socket = match flows.get(&client) {
            Some(socket) => socket.clone(),
            None => {
                let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .map_err(std::io::Error::other)?;
                let socket = Arc::new(UdpSocket::bind(bind).await?);
                socket.connect(upstream).await?;
                tokio::spawn(from_upstream(
                    socket.clone(),
                    listen.clone(),
                    client,
                    down_shaper.clone(),
                    down_tx.clone(),
                    seq.clone(),
                    stats.clone(),
                ));
                flows.insert(client, socket.clone());
                socket
            }
        };
        let departures = up_shaper.schedule(Instant::now(), n);
        enqueue(&up_tx, &seq, &stats, departures, &buf[..n], Sink::Up(socket.clone()));
    }
}

/// Queues one copy of `data` per departure time on the delay line; none means dropped.
fn enqueue(
    tx: &mpsc::UnboundedSender<Item>,
    seq: &AtomicU64,
    stats: &Stats,
    departures: Vec<Instant>,
    data: &[u8],
    sink: Sink,
) {
    if departures.is_empty() {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
    for at in departures {
        let item =
            Item { at, seq: seq.fetch_add(1, Ordering::Relaxed), data: data.to_vec(), sink: sink.clone() };
        let _ = tx.send(item);
    }
}

async fn from_upstream(
    socket: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    shaper: Arc<Mutex<Shaper>>,
    tx: mpsc::UnboundedSender<Item>,
    seq: Arc<AtomicU64>,
    stats: Arc<Stats>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = socket.recv(&mut buf).await {
        stats.received.fetch_add(1, Ordering::Relaxed);
        let departures = match shaper.lock() {
            Ok(mut shaper) => shaper.schedule(Instant::now(), n),
            Err(_) => return,
        };
        enqueue(&tx, &seq, &stats, departures, &buf[..n], Sink::Down(listen.clone(), client));
    }
}

/// A TCP proxy from `listener` to `upstream` that delays every chunk by `delay` in each direction,
/// keeping order: a path with a round trip of twice `delay` for TCP-based tunnels. A new connection
/// costs what it costs on such a path: the far side accepts it after 1.5 round trips, and bytes the
/// client sends early arrive no sooner. Runs until the listener fails.
pub async fn tcp_delay(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    delay: Duration,
) -> std::io::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let established = Instant::now() + delay * 3;
            let _ = client.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (tx, rx) = mpsc::channel(1024);
            let forward = async move {
                sleep_until_precise(established).await;
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = server.set_nodelay(true);
                let (server_read, server_write) = server.into_split();
                let (back_tx, back_rx) = mpsc::channel(1024);
                tokio::join!(
                    write_chunks(rx, server_write),
                    read_chunks(server_read, back_tx, delay, Instant::now()),
                    write_chunks(back_rx, client_write),
                );
            };
            tokio::join!(read_chunks(client_read, tx, delay, established), forward);
        });
    }
}

type Chunk = (Instant, Option<Vec<u8>>);

/// Reads chunks and queues each with its arrival time: `delay` later, and not before `not_before`.
async fn read_chunks(
    mut from: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    delay: Duration,
    not_before: Instant,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        let chunk = (n > 0).then(|| buf[..n].to_vec());
        let at = (Instant::now() + delay).max(not_before);
        if tx.send((at, chunk)).await.is_err() || n == 0 {
            break;
        }
    }
}

/// Writes queued chunks at their arrival times; an end-of-stream marker becomes a FIN.
async fn write_chunks(mut rx: mpsc::Receiver<Chunk>, mut to: tokio::net::tcp::OwnedWriteHalf) {
    use tokio::io::AsyncWriteExt;
    while let Some((at, chunk)) = rx.recv().await {
        sleep_until_precise(at).await;
        match chunk {
            Some(bytes) if to.write_all(&bytes).await.is_ok() => {}
            _ => break,
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp() -> Impairment {
        Impairment { delay: Duration::from_millis(10), seed: 42, ..Impairment::default() }
    }

    #[test]
    fn same_seed_same_fate() {
        let now = Instant::now();
        let cfg =
            Impairment { loss: 0.3, jitter: Duration::from_millis(3), reorder: 0.1, duplicate: 0.1, ..imp() };
        let run = || {
            let mut s = Shaper::new(cfg.clone());
            (0..1000).map(|i| s.schedule(now + Duration::from_micros(i * 100), 1200)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn loss_duplication_and_delay_have_the_asked_for_effect() {
        let now = Instant::now();
        let mut s = Shaper::new(Impairment {
            loss: 0.02,
            duplicate: 0.01,
            jitter: Duration::from_millis(2),
            ..imp()
        });
        let (mut dropped, mut doubled) = (0, 0);
        for _ in 0..100_000 {
            let d = s.schedule(now, 1200);
            match d.len() {
                0 => dropped += 1,
                2 => doubled += 1,
                _ => {}
            }
            for at in d {
                let delay = at - now;
                assert!(
                    delay >= Duration::from_millis(8)
                        && delay <= Duration::from_millis(12) + Duration::from_micros(100),
                    "{delay:?}"
                );
            }
        }
        assert!((1_700..2_300).contains(&dropped), "dropped {dropped} of 100000 at 2%");
        assert!((800..1_200).contains(&doubled), "duplicated {doubled} of 100000 at 1%");
    }

    #[test]
    fn rate_limit_spaces_packets_and_drops_past_the_queue() {
        let now = Instant::now();
        // 1 Mbit/s: a 1250-byte packet takes 10 ms on the wire.
        let mut s = Shaper::new(Impairment { rate_bps: Some(1_000_000), ..imp() });
        let first = s.schedule(now, 1250)[0];
        let second = s.schedule(now, 1250)[0];
        assert_eq!(second - first, Duration::from_millis(10));
        let kept = (0..100).filter(|_| !s.schedule(now, 1250).is_empty()).count();
        assert!((19..=22).contains(&kept), "a 200 ms queue holds about 20 packets, kept {kept}");
    }

    #[test]
    fn reordered_packets_leave_after_later_ones() {
        let now = Instant::now();
        let mut s = Shaper::new(Impairment { reorder: 0.5, ..imp() });
        let times: Vec<Instant> =
            (0..200).map(|i| s.schedule(now + Duration::from_micros(i * 10), 1200)[0]).collect();
        let inversions = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 20, "expected reordering, saw {inversions} inversions");
    }

    #[tokio::test]
    async fn proxy_adds_the_delay_both_ways() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
        let listen = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let proxy = listen.local_addr().expect("addr");
        let delay = Impairment { delay: Duration::from_millis(15), ..imp() };
        tokio::spawn(run(listen, server_addr, delay.clone(), delay, Arc::new(Stats::default())));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(proxy).await.expect("connect");
        for i in 0..5u8 {
            let started = std::time::Instant::now();
            client.send(&[i; 100]).await.expect("send");
            let mut buf = [0u8; 200];
            let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("answer")
                .expect("recv");
            assert_eq!(&buf[..n], &[i; 100]);
            let rtt = started.elapsed();
            assert!(rtt >= Duration::from_millis(30) && rtt < Duration::from_millis(200), "rtt {rtt:?}");
        }
    }
}
