//! The HTTP listener's lingering close: a client still uploading a body when the relay answers
//! (a refusal, a failed target) reads the answer, not a reset.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use sallyport_tests::{servers, RunningRelay, TestPki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_its_body_reads_the_refusal() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let closed = servers::free_port();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        "[services.gone]\nagent = \"winbox\"\nhosts = [\"gone.home.lan\"]\n",
        &format!("[services.gone]\ntarget = \"tcp://127.0.0.1:{closed}\"\n"),
    )
    .await;
    let http = relay.http.expect("http listener");
    let answers = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| {
                let mut stream = TcpStream::connect(http).expect("connect");
                stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                let head = "POST /upload HTTP/1.1\r\nHost: gone.home.lan\r\nContent-Length: 8000000\r\n\r\n";
                stream.write_all(head.as_bytes()).expect("head");
                let chunk = vec![b'x'; 80_000];
                let _ = stream.write_all(&chunk);
                // The relay answers 502 meanwhile (the answer is waiting to be read); the client goes
                // on with its body, as curl does after `Expect: 100-continue`, and gives up on the
                // first failed write, as curl does.
                stream.peek(&mut [0u8; 1]).expect("the relay's answer arrives");
                let sent = (1..100).try_for_each(|_| stream.write_all(&chunk));
                assert!(sent.is_ok(), "the whole body went out: {sent:?}");
                let mut answer = Vec::new();
                let read = stream.read_to_end(&mut answer);
                (read.err().map(|e| e.kind()), String::from_utf8_lossy(&answer).into_owned())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("clients");
    for (error, answer) in &answers {
        assert!(answer.starts_with("HTTP/1.1 502"), "the refusal, not a reset: {error:?} {answer:?}");
        assert!(answer.contains("the target refused the connection"), "{answer}");
    }
    println!("5 clients still sending a body read: {:?}", answers[0].1.lines().next());
    agent.stop().await;
    relay.stop().await;
}
