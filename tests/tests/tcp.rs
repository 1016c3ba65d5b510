//! The TCP channel on loopback: agents that reach the server only over
//! TLS + WebSocket (its TCP port, the HTTP listener a front forwards to, a
//! real TLS-terminating front (nginx) with its own certificate, or a real
//! HTTP CONNECT proxy, tinyproxy) register, connect and relay; bad
//! input on the TCP side is dropped and counted while other agents carry
//! on.

use punch_lab::harness::{bin, clear_agent_env, run, Proc, ServerProc};
use punch_protocol::signal::{ClientMsg, Hello, ServerMsg};
use punch_protocol::ws::{self, WsAuth, WsFrame};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A punch-agent command with `server` as its --server.
fn agent(s: &ServerProc, server: &str) -> Command {
    let mut cmd = Command::new(bin("punch-agent").unwrap());
    cmd.args(["--server", server, "--server-fingerprint", &s.fingerprint])
        .args(["--bind", "127.0.0.1:0", "--no-nat-check"]);
    clear_agent_env(&mut cmd);
    cmd
}

fn serve(s: &ServerProc, dir: &Path, server: &str, id: &str, extra: &[&str]) -> Proc {
    let mut cmd = agent(s, server);
    cmd.args(["serve", "--id", id, "--key-file"])
        .arg(dir.join(format!("{id}.key")))
        .args(extra);
    let mut p = Proc::spawn(id, cmd, Some(&dir.join(format!("{id}.log")))).unwrap();
    p.wait_line("serving as", Duration::from_secs(30)).unwrap();
    p
}

fn connect_json(cmd: Command) -> serde_json::Value {
    let r = run(cmd, T).unwrap();
    assert_eq!(r.code, Some(0), "connect failed: {r:?}");
    r.json().unwrap()
}

fn health(s: &ServerProc) -> serde_json::Value {
    serde_json::from_str(&s.http_get("/healthz").unwrap()).unwrap()
}

#[test]
fn tcp_only_agents_register_connect_and_relay_over_the_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let tcp = s.tcp.expect("the server listens on TCP by default");
    assert_eq!(tcp.port(), s.udp.port(), "TCP defaults to the UDP port");
    let wss = format!("wss://{tcp}/ws");
    let _b = serve(&s, dir.path(), &wss, "wb", &[]);

    // Both sides on TCP: the relay carries QUIC over two WebSockets.
    let mut c = agent(&s, &wss);
    c.args(["connect", "wb", "--json", "--force-relay"]);
    let j = connect_json(c);
    assert_eq!(j["path"], "relayed", "{j}");
    assert_eq!(j["transport"], "tcp", "{j}");
    assert!(j["rtt_ms"].as_f64().unwrap() > 0.0, "{j}");

    // A UDP agent and a TCP agent share one relay session.
    let mut c = agent(&s, &s.udp.to_string());
    c.args(["connect", "wb", "--json", "--force-relay"]);
    let j = connect_json(c);
    assert_eq!(j["path"], "relayed", "{j}");
    assert_eq!(j["transport"], "udp", "{j}");

    // Without --force-relay the UDP agent still connects (punching to the
    // TCP agent's own UDP address on this host, or on the relay at once).
    let mut c = agent(&s, &s.udp.to_string());
    c.args(["connect", "wb", "--json"]);
    connect_json(c);

    let h = health(&s);
    assert!(h["tcp"]["channels"].as_u64().unwrap() >= 2, "{h}");
    assert!(
        h["metrics"]["registrations_tcp"].as_u64().unwrap() >= 2,
        "{h}"
    );
    assert!(h["relay"]["forwarded_packets"].as_u64().unwrap() > 0, "{h}");
    let workers = s.http_get("/api/v1/workers/wb").unwrap();
    assert!(workers.contains("\"transport\":\"tcp\""), "{workers}");
    let metrics = s.http_get("/metrics").unwrap();
    assert!(metrics.contains("punch_tcp_channels_total"), "{metrics}");
}

#[test]
fn the_http_listener_takes_the_websocket_as_behind_a_front() {
    let dir = tempfile::tempdir().unwrap();
    // No TCP port at all: only the HTTP listener, as behind Cloud Run.
    let s = ServerProc::start(dir.path(), &["--no-tcp"]).unwrap();
    assert_eq!(s.tcp, None);
    let front = format!("ws://{}/ws", s.http);
    let _b = serve(&s, dir.path(), &front, "wb", &[]);
    let mut c = agent(&s, &front);
    c.args(["connect", "wb", "--json", "--force-relay"]);
    let j = connect_json(c);
    assert_eq!(j["transport"], "tcp", "{j}");
    // A UDP agent whose QUIC never answers (a closed port) falls back to the
    // TCP channel named by --server-tcp.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut c = agent(&s, &dead_addr);
    c.args([
        "--server-tcp",
        &front,
        "connect",
        "wb",
        "--json",
        "--force-relay",
    ]);
    let j = connect_json(c);
    assert_eq!(j["transport"], "tcp", "{j}");
}

#[test]
fn the_websocket_is_renewed_at_its_maximum_age_under_a_live_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let wss = format!("wss://{}/ws", s.tcp.unwrap());
    let _b = serve(&s, dir.path(), &wss, "wb", &["--ws-max-age", "10"]);
    // 30 round trips over 15 s on the relay over TCP: both sides renew
    // their WebSocket under the connection at least once.
    let mut c = agent(&s, &wss);
    c.args(["--ws-max-age", "10", "--force-relay"])
        .args(["ping", "wb", "-c", "30", "-i", "0.5", "--json"]);
    let j = connect_json(c);
    assert_eq!(j["rtts_ms"].as_array().unwrap().len(), 30, "{j}");
    assert!(
        j["transports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t == "tcp"),
        "{j}"
    );
    let log = std::fs::read_to_string(dir.path().join("wb.log")).unwrap();
    assert!(
        log.contains("maximum age"),
        "the serving side never renewed: {log}"
    );
    let h = health(&s);
    assert!(h["tcp"]["channels"].as_u64().unwrap() >= 4, "{h}");
}

/// tinyproxy on loopback with Basic auth; returns it and its port.
fn tinyproxy(dir: &Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nAllow 127.0.0.1\n\
             Timeout 60\nMaxClients 20\nLogLevel Info\nBasicAuth punch s3cret\nDisableViaHeader Yes\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("tinyproxy");
    cmd.arg("-d").arg("-c").arg(&conf);
    let log = dir.join("tinyproxy.log");
    let mut p = Proc::spawn_tee("tinyproxy", cmd, &log)
        .expect("tinyproxy is needed (apt-get install -y tinyproxy)");
    p.wait_line("Accepting connections", Duration::from_secs(20))
        .unwrap();
    (p, port)
}

#[test]
fn an_http_connect_proxy_with_basic_auth_carries_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).unwrap();
    let wss = format!("wss://{}/ws", s.tcp.unwrap());
    let (_proxy, port) = tinyproxy(dir.path());
    let good = format!("http://punch:s3cret@127.0.0.1:{port}");
    let _b = serve(&s, dir.path(), &wss, "wb", &["--proxy", &good]);
    let log = std::fs::read_to_string(dir.path().join("tinyproxy.log")).unwrap();
    assert!(log.contains("CONNECT"), "the proxy saw no CONNECT: {log}");

    // Through the proxy from the environment, to a relayed connection.
    let mut c = agent(&s, &wss);
    c.env("HTTPS_PROXY", &good)
        .args(["connect", "wb", "--json", "--force-relay"]);
    let j = connect_json(c);
    assert_eq!(j["transport"], "tcp", "{j}");

    // Wrong credentials: a clear error, no hang.
    let mut c = agent(&s, &wss);
    c.args(["--proxy", &format!("http://punch:wrong@127.0.0.1:{port}")])
        .args(["list", "--json"]);
    let r = run(c, T).unwrap();
    assert_ne!(r.code, Some(0), "{r:?}");
    // tinyproxy answers 401 where RFC 9110 says 407; either is clear.
    assert!(r.stderr.contains("credentials"), "{r:?}");

    // NO_PROXY exempts the server: a dead proxy is never tried.
    let mut c = agent(&s, &wss);
    c.env("HTTPS_PROXY", "http://127.0.0.1:1")
        .env("NO_PROXY", "localhost,127.0.0.0/8")
        .args(["list", "--json"]);
    let r = run(c, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// Reads until the server closes the connection (or `limit` passes).
fn closed_within(mut s: TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    time_to_close(&mut s, limit).is_some()
}

type Sock = tungstenite::WebSocket<TcpStream>;

fn ws_open(http: SocketAddr) -> Sock {
    let tcp = TcpStream::connect(http).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{http}/ws"), tcp).unwrap();
    ws
}

fn ws_next(ws: &mut Sock) -> Option<Vec<u8>> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => return Some(b.to_vec()),
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn ws_send(ws: &mut Sock, b: Vec<u8>) -> bool {
    ws.send(tungstenite::Message::Binary(b.into())).is_ok()
}

/// A raw agent over the WebSocket: the key handshake and hello by hand.
fn ws_register(http: SocketAddr, id: &str) -> Sock {
    let key = punch_tls::Identity::generate().unwrap();
    let mut ws = ws_open(http);
    let first = ws_next(&mut ws).expect("server hello");
    let WsFrame::Auth(b) = ws::parse(&first).unwrap() else {
        panic!("expected auth")
    };
    let WsAuth::ServerHello { nonce, .. } = ws::decode::<WsAuth>(b).unwrap() else {
        panic!("expected server hello")
    };
    let cn = [7u8; 32];
    let signature = key.sign(&ws::client_signed(&nonce, &cn)).unwrap();
    assert!(ws_send(
        &mut ws,
        ws::encode_auth(&WsAuth::ClientAuth {
            nonce: cn,
            signature
        })
    ));
    let hello = ClientMsg::Hello(Hello {
        version: punch_protocol::PROTOCOL_VERSION,
        worker_id: id.into(),
        public_key: key.public_key(),
        token_proof: None,
        ephemeral: true,
        local_candidates: vec![],
        metadata: vec![],
        kind: None,
        tags: vec![],
    });
    assert!(ws_send(&mut ws, ws::encode_signal(&hello)));
    let auth = ws_next(&mut ws).expect("server proof");
    assert!(matches!(ws::parse(&auth), Ok(WsFrame::Auth(_))));
    let welcome = ws_next(&mut ws).expect("welcome");
    let WsFrame::Signal(b) = ws::parse(&welcome).unwrap() else {
        panic!("expected welcome")
    };
    assert!(matches!(
        ws::decode::<ServerMsg>(b).unwrap(),
        ServerMsg::Welcome { .. }
    ));
    ws
}

#[test]
fn bad_input_on_the_tcp_side_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--max-tcp-clients", "3"]).unwrap();
    let tcp = s.tcp.unwrap();

    // A connection closed before any byte (an agent whose QUIC answered
    // first): counted apart from failed handshakes.
    drop(TcpStream::connect(tcp).unwrap());
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while health(&s)["tcp"]["abandoned"].as_u64() != Some(1) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let h = health(&s);
    assert_eq!(h["tcp"]["abandoned"].as_u64(), Some(1), "{h}");
    assert_eq!(h["tcp"]["tls_failures"].as_u64(), Some(0), "{h}");

    // Plain HTTP and garbage on the TLS port: closed.
    let mut c = TcpStream::connect(tcp).unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(
        closed_within(c, Duration::from_secs(15)),
        "plain HTTP on the TLS port"
    );
    let mut c = TcpStream::connect(tcp).unwrap();
    let junk: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = c.write_all(&junk);
    assert!(
        closed_within(c, Duration::from_secs(15)),
        "garbage on the TLS port"
    );

    // An upgrade without the WebSocket key: refused.
    let mut c = TcpStream::connect(s.http).unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 4"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );

    // A text message, an unknown kind, and an oversized message before the
    // handshake: each channel is closed.
    let mut ws = ws_open(s.http);
    ws_next(&mut ws).unwrap();
    ws.send(tungstenite::Message::Text("hello".into())).unwrap();
    assert_eq!(ws_next(&mut ws), None, "a text message ends the channel");
    let mut ws = ws_open(s.http);
    ws_next(&mut ws).unwrap();
    ws_send(&mut ws, vec![0x42; 10]);
    ws_send(&mut ws, vec![0x42; 10]);
    assert_eq!(
        ws_next(&mut ws).map(|m| m[0]),
        Some(ws::KIND_SIGNAL),
        "an error first"
    );
    assert_eq!(ws_next(&mut ws), None);
    let mut ws = ws_open(s.http);
    ws_next(&mut ws).unwrap();
    let _ = ws_send(&mut ws, vec![0; ws::MAX_MESSAGE + 1024]);
    assert_eq!(
        ws_next(&mut ws),
        None,
        "an oversized message ends the channel"
    );

    // A registered channel sends relay frames for sessions the server does
    // not know: each is answered "unknown" (so an agent whose server
    // restarted renews) and counted; the channel stays up and answers a
    // ping.
    let mut ws = ws_register(s.http, "raw-1");
    for i in 0..10u64 {
        let mut f = vec![0u8; punch_protocol::relay::DATA_HEADER + 100];
        punch_protocol::relay::write_data_header(&mut f, punch_protocol::signal::SessionId(i));
        assert!(ws_send(&mut ws, f));
    }
    let bind = punch_protocol::relay::encode_bind_request(
        &[9; 32],
        punch_protocol::signal::SessionId(5),
        punch_protocol::signal::Role::Controlling,
        1,
    );
    assert!(ws_send(&mut ws, bind));
    assert!(ws_send(
        &mut ws,
        ws::encode_signal(&ClientMsg::Ping { req: 77 })
    ));
    let mut unknown = 0;
    let pong = loop {
        let m = ws_next(&mut ws).expect("the channel survives bad relay frames");
        match ws::parse(&m).unwrap() {
            WsFrame::Signal(b) => break b.to_vec(),
            WsFrame::Relay(f) => {
                assert!(
                    matches!(
                        punch_protocol::relay::parse(f),
                        Ok(punch_protocol::relay::Frame::Unknown { .. })
                    ),
                    "only 'unknown' answers, got {f:?}"
                );
                unknown += 1;
            }
            WsFrame::Auth(_) => panic!("an auth frame from the server"),
        }
    };
    // Signaling goes out before relay frames: some answers may follow the
    // pong; the server counted every one before it read the ping.
    assert!(unknown <= 11, "{unknown} answers to 11 frames");
    let b = &pong[..];
    assert_eq!(
        ws::decode::<ServerMsg>(b).unwrap(),
        ServerMsg::Pong { req: 77 }
    );
    let h = health(&s);
    assert_eq!(h["relay"]["unknown_replies"].as_u64(), Some(11), "{h}");

    // The client cap (3): one registered, two more fill it, the next is 503.
    let _a = ws_open(s.http);
    let _b = ws_open(s.http);
    let mut c = TcpStream::connect(s.http).unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_exact(&mut head).unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 503"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    drop((_a, _b, ws));

    let h = health(&s);
    let tcp_stats = &h["tcp"];
    assert!(tcp_stats["tls_failures"].as_u64().unwrap() >= 2, "{h}");
    assert!(tcp_stats["protocol_errors"].as_u64().unwrap() >= 2, "{h}");
    assert!(tcp_stats["refused_full"].as_u64().unwrap() >= 1, "{h}");

    // And a real agent still gets in over TCP.
    let mut c = agent(&s, &format!("wss://{tcp}/ws"));
    c.args(["list", "--json"]);
    let r = run(c, T).unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// A certificate authority and a certificate for 127.0.0.1 it signed, as
/// PEM files in `dir`: (ca, cert, key).
fn front_certs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "punch test front CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("front.pem"),
        dir.join("front.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A real TLS-terminating front, nginx, that forwards `/ws` (with the
/// standard upgrade headers) to the server's HTTP listener, as a load
/// balancer or ingress does. None when nginx is not installed.
fn nginx_front(dir: &Path, http: SocketAddr) -> Option<(Proc, u16, std::path::PathBuf)> {
    let missing = punch_lab::harness::missing_tools(&[("nginx", "nginx-light")]);
    if !punch_lab::harness::ready("the nginx front test", &missing) {
        return None;
    }
    let (ca, cert, key) = front_certs(dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location /ws {{
      proxy_pass http://{http};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&path);
    let p = Proc::spawn("nginx", cmd, Some(&dir.join("nginx.log"))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not listen on {port}: {}",
            std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((p, port, ca))
}

#[test]
fn behind_a_real_tls_terminating_front_with_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--no-tcp"]).unwrap();
    let Some((_nginx, port, ca)) = nginx_front(dir.path(), s.http) else {
        return;
    };
    let front = format!("wss://127.0.0.1:{port}/ws");
    let ca = ca.to_str().unwrap();
    // The front's certificate is checked against --server-ca; the server
    // itself is still authenticated by its pinned key through the front.
    let _b = serve(&s, dir.path(), &front, "wb", &["--server-ca", ca]);
    let mut c = agent(&s, &front);
    c.args([
        "--server-ca",
        ca,
        "connect",
        "wb",
        "--json",
        "--force-relay",
    ]);
    let j = connect_json(c);
    assert_eq!(j["transport"], "tcp", "{j}");
    assert_eq!(j["path"], "relayed", "{j}");
    let h = health(&s);
    assert!(
        h["metrics"]["registrations_tcp"].as_u64().unwrap() >= 2,
        "{h}"
    );
    // Without the CA the front's certificate is refused, clearly.
    let mut c = agent(&s, &front);
    c.args(["connect", "wb", "--json"]);
    let r = run(c, T).unwrap();
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("certificate"), "{r:?}");
}

/// How long the server took to close `s` (end of stream, a reset, or a
/// TLS stream cut without its close), reading (and discarding) what it
/// sends; `None` when it was still open after `limit` or failed otherwise.
/// `s` needs a short read timeout: each read may take that long.
fn time_to_close<S: Read>(s: &mut S, limit: Duration) -> Option<Duration> {
    use std::io::ErrorKind::{ConnectionReset, TimedOut, UnexpectedEof, WouldBlock};
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => {}
            Err(e) if matches!(e.kind(), ConnectionReset | UnexpectedEof) => {
                return Some(start.elapsed())
            }
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn silent_and_trickling_clients_are_closed_at_the_head_deadline_and_the_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(
        dir.path(),
        &["--header-timeout-secs", "1", "--max-http-conns", "6"],
    )
    .unwrap();
    let limit = Duration::from_secs(8);
    let open = |addr: SocketAddr| {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        c
    };

    // Silent: connects and sends nothing.
    let mut silent = open(s.http);
    let t = time_to_close(&mut silent, limit).expect("a silent client is closed");
    assert!(t >= Duration::from_millis(500), "closed after {t:?}");

    // Slow-loris: a request line, then a header byte every 200 ms, for
    // ever: the deadline counts from the start of the head, not from the
    // last byte, so it is closed too.
    let mut loris = open(s.http);
    loris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        .unwrap();
    let start = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let closed = loop {
        // The 200 ms read timeout paces the trickle.
        match loris.read(&mut byte) {
            Ok(0) => break Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break Some(start.elapsed())
            }
            Err(_) => {}
        }
        if start.elapsed() > limit {
            break None;
        }
        if loris.write_all(b"a").is_err() {
            break Some(start.elapsed());
        }
    };
    let t = closed.expect("a trickling client is closed");
    assert!(t >= Duration::from_millis(500), "closed after {t:?}");

    // A client that completes TLS on the TCP port and then sends nothing.
    let verifier = punch_tls::tcp::FrontVerifier::new(&s.fingerprint, None).unwrap();
    let cfg = punch_tls::tcp::client_config(verifier);
    let name = rustls::pki_types::ServerName::try_from("punch").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, open(s.tcp.unwrap()));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    let t = time_to_close(&mut tls, limit).expect("a silent TLS client is closed");
    assert!(t >= Duration::from_millis(500), "closed after {t:?}");

    // The cap: six idle connections fill the HTTP listener; the seventh is
    // closed at accept, without an answer.
    let mut idle: Vec<TcpStream> = (0..6).map(|_| open(s.http)).collect();
    let mut seventh = TcpStream::connect(s.http).unwrap();
    let _ = seventh.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    // Well before the 1 s deadline: closed at accept, not held.
    seventh
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut got = [0u8; 64];
    match seventh.read(&mut got) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "served beyond the cap: {:?}",
            String::from_utf8_lossy(&got[..n])
        ),
        Err(e) => panic!("the seventh connection was held: {e}"),
    }
    // The idle ones leave at the deadline, and the listener serves again.
    for c in &mut idle {
        assert!(
            time_to_close(c, limit).is_some(),
            "an idle connection is closed"
        );
    }
    let h = health(&s);
    assert!(h["http"]["refused_full"].as_u64().unwrap() >= 1, "{h}");
    // Silent, slow-loris and six idle.
    assert!(h["http"]["header_timeouts"].as_u64().unwrap() >= 8, "{h}");
    assert!(h["tcp"]["header_timeouts"].as_u64().unwrap() >= 1, "{h}");
    let metrics = s.http_get("/metrics").unwrap();
    assert!(
        metrics.contains("punch_http_header_timeouts_total"),
        "{metrics}"
    );
}
