//! Slow HTTP clients against the Host-routed listener: a request body trickled slower than the
//! service's idle timeout, or a response that never comes, closes the client's connection and is
//! counted `idle`; a slow body that keeps moving, and everyone else, are served meanwhile.

use std::{net::SocketAddr, time::Duration};

use sallyport_tests::{metric, targets, RunningRelay, TestPki};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends an upload's head for `length` body bytes to `host`, then the body one byte every `gap`,
/// and returns what the connection gave back (its end, or the relay's answer) and when.
async fn trickle(http: SocketAddr, host: &str, length: usize, gap: Duration) -> (String, Duration) {
    let mut stream = TcpStream::connect(http).await.expect("connect");
    let head = format!("PUT /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..length {
        tokio::select! {
            read = stream.read(&mut buf) => {
                match read {
                    Ok(0) => return ("closed".into(), started.elapsed()),
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e) => return (format!("reset: {e}"), started.elapsed()),
                }
            }
            () = tokio::time::sleep(gap) => {
                if let Err(e) = stream.write_all(b"x").await {
                    return (format!("write failed: {e}"), started.elapsed());
                }
            }
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let tail = match ended {
        Ok(Ok(_)) => String::from_utf8_lossy(&answer).into_owned(),
        Ok(Err(e)) => format!("reset: {e}"),
        Err(_) => "no answer in 10 s".into(),
    };
    (tail, started.elapsed())
}

async fn get(http: SocketAddr, host: &str) -> String {
    let mut stream = TcpStream::connect(http).await.expect("connect");
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await {
        Ok(Ok(_)) if answer.is_empty() => "closed".into(),
        Ok(Ok(_)) => String::from_utf8_lossy(&answer).into_owned(),
        Ok(Err(e)) => format!("reset: {e}"),
        Err(_) => "no answer in 10 s".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_or_response_slower_than_the_idle_timeout_closes_the_connection_and_counts_idle() {
    sallyport_tests::init_logging();
    let upload = targets::http_upload().await;
    let sink = targets::sink().await;
    let web = targets::http_ok("hello").await;
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        "[services.upload]\nagent = \"winbox\"\nhosts = [\"upload.home.lan\"]\nidle_timeout = \"2s\"\n\
         [services.stuck]\nagent = \"winbox\"\nhosts = [\"stuck.home.lan\"]\nidle_timeout = \"2s\"\n\
         [services.patient]\nagent = \"winbox\"\nhosts = [\"patient.home.lan\"]\nidle_timeout = \"0s\"\n\
         [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n",
        &format!(
            "[services.upload]\ntarget = \"tcp://{}\"\n[services.stuck]\ntarget = \"tcp://{}\"\n\
             [services.patient]\ntarget = \"tcp://{}\"\n[services.web]\ntarget = \"tcp://{}\"\n",
            upload.addr, sink.addr, sink.addr, web.addr
        ),
    )
    .await;
    let http = relay.http.expect("http listener");

    // The attacker trickles one byte every 3 s; a slow but honest client one every 0.5 s, for
    // longer than the idle timeout in all; a response that never comes; and plain requests.
    let attacker = tokio::spawn(trickle(http, "upload.home.lan", 20, Duration::from_secs(3)));
    let honest = tokio::spawn(trickle(http, "upload.home.lan", 8, Duration::from_millis(500)));
    let stuck = tokio::spawn(async move {
        let started = std::time::Instant::now();
        (get(http, "stuck.home.lan").await, started.elapsed())
    });
    for _ in 0..10 {
        assert!(get(http, "web.home.lan").await.ends_with("hello"), "plain requests are served meanwhile");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (answer, after) = attacker.await.expect("attacker");
    println!("body trickled 1 byte / 3 s against idle_timeout = 2s: {answer} after {after:?}");
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(3),
        "{answer} after {after:?}"
    );
    let (answer, after) = honest.await.expect("honest");
    println!("body trickled 1 byte / 0.5 s: {:?} after {after:?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("8\n"), "{answer}");
    let (answer, after) = stuck.await.expect("stuck");
    println!("no response from the target: {answer} after {after:?}");
    assert!(answer == "closed" || answer.starts_with("reset"), "{answer}");
    assert!(after >= Duration::from_millis(1900) && after < Duration::from_secs(4), "{after:?}");

    // A service that keeps quiet connections (`idle_timeout = "0s"`) waits for its target.
    let patient = tokio::time::timeout(Duration::from_secs(4), get(http, "patient.home.lan")).await;
    assert!(patient.is_err(), "a service without an idle timeout keeps waiting: {patient:?}");

    let m = relay.metrics().await;
    assert_eq!(metric(&m, "sallyport_connections_total{service=\"upload\",result=\"idle\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "sallyport_connections_total{service=\"stuck\",result=\"idle\"}"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "sallyport_connections_total{service=\"upload\",result=\"completed\"}"),
        1.0,
        "{m}"
    );
    agent.stop().await;
    relay.stop().await;
}
