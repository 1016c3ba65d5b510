//! A raw signaling client for tests of the server's side of the
//! protocol: it registers over real QUIC and sends whatever a test wants.

use super::*;

/// Every wait of a [`RawClient`] on the server.
pub const RAW_WAIT: Duration = Duration::from_secs(10);

/// A registered raw signaling client: sends any message and sees every
/// answer itself (tests of the server's side of the protocol). Panics on
/// anything unexpected; every wait is bounded by [`RAW_WAIT`].
pub struct RawClient {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl RawClient {
    /// Registers `name` with no candidates.
    pub async fn register(s: &ServerProc, name: &str) -> RawClient {
        Self::register_with(s, name, vec![]).await
    }

    /// Registers `name` offering `local_candidates`.
    pub async fn register_with(
        s: &ServerProc,
        name: &str,
        local_candidates: Vec<punch_protocol::signal::Candidate>,
    ) -> RawClient {
        Self::register_opts(s, name, local_candidates, true).await
    }

    /// Registers `name` speaking protocol `version` (welcomed in it).
    pub async fn register_version(s: &ServerProc, name: &str, version: u16) -> RawClient {
        Self::register_full(s, name, vec![], true, version).await
    }

    /// Registers `name` offering `local_candidates`; a worker that is not
    /// `ephemeral` goes stale when its connection drops uncleanly.
    pub async fn register_opts(
        s: &ServerProc,
        name: &str,
        local_candidates: Vec<punch_protocol::signal::Candidate>,
        ephemeral: bool,
    ) -> RawClient {
        let v = punch_protocol::PROTOCOL_VERSION;
        Self::register_full(s, name, local_candidates, ephemeral, v).await
    }

    async fn register_full(
        s: &ServerProc,
        name: &str,
        local_candidates: Vec<punch_protocol::signal::Candidate>,
        ephemeral: bool,
        version: u16,
    ) -> RawClient {
        let id = punch_tls::Identity::generate().unwrap();
        let cfg = punch_tls::client_config(
            &id,
            punch_tls::KeyVerifier::new(punch_tls::Expect::Fingerprint(s.fingerprint.clone())),
            punch_protocol::ALPN_SIGNAL,
        )
        .unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = ep.connect_with(cfg, s.udp, "punch").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut raw = RawClient {
            _ep: ep,
            conn,
            send,
            recv,
        };
        raw.send(punch_protocol::signal::ClientMsg::Hello(
            punch_protocol::signal::Hello {
                version,
                worker_id: name.into(),
                public_key: id.public_key(),
                token_proof: None,
                ephemeral,
                local_candidates,
                metadata: vec![],
                kind: None,
                tags: vec![],
            },
        ))
        .await;
        match raw.next().await {
            punch_protocol::signal::ServerMsg::Welcome { version: v, .. } if v == version => raw,
            m => panic!("{name}: expected a welcome in version {version}, got {m:?}"),
        }
    }

    /// Closes the connection with application `code` (nothing else sent).
    pub fn close(&self, code: u32) {
        self.conn.close(code.into(), b"raw close");
    }

    /// Sends one message.
    pub async fn send(&mut self, m: punch_protocol::signal::ClientMsg) {
        punch_net::write_frame(&mut self.send, &m).await.unwrap();
    }

    /// The next message from the server.
    pub async fn next(&mut self) -> punch_protocol::signal::ServerMsg {
        tokio::time::timeout(RAW_WAIT, punch_net::read_frame(&mut self.recv, 1 << 16))
            .await
            .expect("the server answers within 10 s")
            .expect("a valid frame")
    }

    /// Asks for `target`; the server's answer.
    pub async fn connect(&mut self, req: u32, target: &str) -> punch_protocol::signal::ServerMsg {
        self.send(punch_protocol::signal::ClientMsg::Connect {
            req,
            target: target.into(),
        })
        .await;
        self.next().await
    }

    /// The next message, which must be an offer (with the peer's
    /// allocator when the server sent it beside).
    pub async fn offer(&mut self) -> punch_protocol::signal::Offer {
        let m = self.next().await;
        let what = format!("{m:?}");
        m.into_offer()
            .unwrap_or_else(|| panic!("expected an offer, got {what}"))
    }
}
