//! The hard side of the birthday method as a state machine: its extra
//! sockets, their rounds of flows, and what it makes of the pongs.

use super::*;

/// What a [`HardSide`] needs from the offer.
#[derive(Clone, Copy, Debug)]
pub struct HardParams {
    pub session: SessionId,
    pub secret: [u8; 32],
    pub role: Role,
    /// First transaction id (random in production; below 2^63 so the
    /// round offsets never wrap into the puncher's spray range).
    pub txid_base: u64,
}

/// Something the hard side's driver must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardEvent {
    /// A pong to extra socket `socket`'s ping proved that `addr` reaches
    /// the peer from that socket.
    Validated {
        socket: usize,
        addr: SocketAddr,
        rtt: Duration,
        /// Our address (that socket's mapping) as the peer saw it.
        observed: SocketAddr,
    },
    /// The time limit passed with no pong.
    TimedOut,
}

/// Transaction id offsets: socket `i`'s pings carry `txid_base + i +
/// round * TXID_ROUND` (round 2: pings back to the spray), so a pong names
/// its socket without a table.
pub(super) const TXID_ROUND: u64 = 1_000_000;

/// The hard side of the birthday method on `sockets` extra sockets
/// (indices `0..sockets`): each pings every target twice,
/// [`HARD_ROUND_GAP`] apart (a first ping lost on the way still leaves the
/// mapping, and the second keeps it fresh while the spray arrives),
/// answers the peer's pings with a pong and a ping back, and the first
/// socket whose own ping is answered is the path. After that it only
/// answers pings on the sockets that met the peer, for
/// [`HARD_ANSWER_GRACE`]; after the limit it ignores everything.
#[derive(Debug)]
pub struct HardSide {
    params: HardParams,
    /// Where each socket sends.
    flows: Vec<Vec<SocketAddr>>,
    peer_ip: IpAddr,
    sent_at: Vec<Instant>,
    /// Rounds sent so far (0, 1 or 2).
    rounds: u8,
    next_round: Instant,
    deadline: Instant,
    hits: Vec<usize>,
    /// Where the peer's first authenticated probe to each met socket
    /// came from (in the order of `hits`).
    hits_from: Vec<SocketAddr>,
    outbox: VecDeque<(usize, Transmit)>,
    events: VecDeque<HardEvent>,
    done: bool,
    /// Validated: answer pings on met sockets until then.
    answer_until: Option<Instant>,
    pings_sent: u32,
}

impl HardSide {
    /// Starts at `now` (the first round goes out at once); gives up
    /// `limit` after the second round.
    pub fn new(
        params: HardParams,
        sockets: usize,
        targets: Vec<SocketAddr>,
        now: Instant,
        limit: Duration,
    ) -> Self {
        let sockets = sockets.min(MAX_HARD_SOCKETS);
        Self::with_flows(params, vec![targets; sockets], now, limit)
    }

    /// [`HardSide::new`] with targets of its own for each socket
    /// (`flows[i]` for socket `i`, sent in that order, socket by socket).
    /// Every target must be on the peer's one IP.
    pub fn with_flows(
        params: HardParams,
        mut flows: Vec<Vec<SocketAddr>>,
        now: Instant,
        limit: Duration,
    ) -> Self {
        flows.truncate(MAX_HARD_SOCKETS);
        let peer_ip = flows
            .iter()
            .flatten()
            .next()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
        let sockets = flows.len();
        let empty = flows.iter().all(Vec::is_empty);
        let mut h = HardSide {
            params,
            flows,
            peer_ip,
            sent_at: vec![now; sockets],
            rounds: 0,
            next_round: now,
            deadline: now + HARD_ROUND_GAP + limit,
            hits: Vec::new(),
            hits_from: Vec::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            done: false,
            answer_until: None,
            pings_sent: 0,
        };
        if empty {
            h.finish(HardEvent::TimedOut);
        } else {
            h.handle_timeout(now);
        }
        h
    }

    fn finish(&mut self, ev: HardEvent) {
        self.done = true;
        self.events.push_back(ev);
    }

    fn ping(&self, txid: u64) -> Vec<u8> {
        Probe::ping(self.params.role, self.params.session, txid).encode(&self.params.secret)
    }

    /// Sends the rounds that are due, or gives up at the limit.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.answer_until.is_some_and(|t| now >= t) {
            self.answer_until = None;
        }
        if self.done {
            return;
        }
        if self.rounds < 2 && now >= self.next_round {
            let round = self.rounds as u64;
            for i in 0..self.sent_at.len() {
                let payload = self.ping(self.params.txid_base + i as u64 + round * TXID_ROUND);
                for t in &self.flows[i] {
                    self.outbox.push_back((
                        i,
                        Transmit {
                            dst: *t,
                            payload: payload.clone(),
                        },
                    ));
                    self.pings_sent += 1;
                }
                self.sent_at[i] = now;
            }
            self.rounds += 1;
            self.next_round = now + HARD_ROUND_GAP;
        } else if self.rounds >= 2 && now >= self.deadline {
            self.finish(HardEvent::TimedOut);
        }
    }

    /// Handles a probe that arrived on extra socket `sock` from `from`.
    pub fn handle_probe(
        &mut self,
        sock: usize,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Result<(), ProbeError> {
        if sock >= self.sent_at.len() {
            return Err(ProbeError::BadField);
        }
        if self.done {
            let answering = self.answer_until.is_some_and(|t| now < t);
            if !answering || !self.hits.contains(&sock) {
                return Err(ProbeError::BadField);
            }
            let pong = answer_ping(&self.params, self.peer_ip, from, data)?;
            self.outbox.push_back((
                sock,
                Transmit {
                    dst: from,
                    payload: pong,
                },
            ));
            return Ok(());
        }
        let p = Probe::decode(data, &self.params.secret)?;
        let peer_ip = self.peer_ip;
        if p.session != self.params.session
            || p.role == self.params.role
            || from.ip().to_canonical() != peer_ip
        {
            return Err(ProbeError::BadField);
        }
        match p.kind {
            ProbeKind::Ping => {
                // The spray found this socket: answer, and ping back so our
                // side validates too.
                let pong = p
                    .pong_to(self.params.role, from)
                    .encode(&self.params.secret);
                let back = self.ping(self.params.txid_base + sock as u64 + 2 * TXID_ROUND);
                self.outbox.push_back((
                    sock,
                    Transmit {
                        dst: from,
                        payload: pong,
                    },
                ));
                self.outbox.push_back((
                    sock,
                    Transmit {
                        dst: from,
                        payload: back,
                    },
                ));
                self.pings_sent += 1;
                self.sent_at[sock] = now;
                self.met_at(sock, from);
            }
            ProbeKind::Pong { observed } => {
                let k = p.txid.wrapping_sub(self.params.txid_base) % TXID_ROUND;
                if k != sock as u64 {
                    return Err(ProbeError::BadField);
                }
                let rtt = now.saturating_duration_since(self.sent_at[sock]);
                self.met_at(sock, from);
                self.answer_until = Some(now + HARD_ANSWER_GRACE);
                self.finish(HardEvent::Validated {
                    socket: sock,
                    addr: from,
                    rtt,
                    observed,
                });
            }
        }
        Ok(())
    }

    /// Next datagram to send, and the index of the socket to send it from.
    pub fn poll_transmit(&mut self) -> Option<(usize, Transmit)> {
        self.outbox.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<HardEvent> {
        self.events.pop_front()
    }

    /// When [`HardSide::handle_timeout`] must be called next; `None` once
    /// done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            self.answer_until
        } else if self.rounds < 2 {
            Some(self.next_round)
        } else {
            Some(self.deadline)
        }
    }

    /// The sockets the peer's pings reached, in order: the peer may have
    /// validated one of them (its ordinary punching meets them too when its
    /// filter is looser than its class said) and will send there.
    pub fn met(&self) -> &[usize] {
        &self.hits
    }

    /// Where the peer's first authenticated probe to met socket `sock` came
    /// from: QUIC from there on that socket is the peer's.
    pub fn met_from(&self, sock: usize) -> Option<SocketAddr> {
        let i = self.hits.iter().position(|s| *s == sock)?;
        self.hits_from.get(i).copied()
    }

    fn met_at(&mut self, sock: usize, from: SocketAddr) {
        if !self.hits.contains(&sock) {
            self.hits.push(sock);
            self.hits_from
                .push(SocketAddr::new(from.ip().to_canonical(), from.port()));
        }
    }

    /// Pings sent so far (both rounds and the pings back).
    pub fn pings_sent(&self) -> u32 {
        self.pings_sent
    }

    /// Done: validated or timed out.
    pub fn is_done(&self) -> bool {
        self.done
    }
}
