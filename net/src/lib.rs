//! QUIC plumbing shared by the punch server and agent.

use punch_protocol::codec::{self, CodecError};
use serde::{de::DeserializeOwned, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// Errors reading or writing frames on a QUIC stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream closed")]
    Closed,
    #[error("read failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = codec::check_len(prefix, max)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(codec::decode_body(&body)?)
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = codec::encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Binds a UDP socket with large buffers. An unspecified IPv4 address
/// (`0.0.0.0`) is bound dual-stack on `[::]` where the OS allows, so one
/// socket serves IPv4 and IPv6.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if let SocketAddr::V4(v4) = addr {
        if v4.ip().is_unspecified() {
            let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, v4.port(), 0, 0));
            if let Ok(s) = bind_one(v6, true) {
                return Ok(s);
            }
        }
    }
    bind_one(addr, false)
}

fn bind_one(addr: SocketAddr, dual: bool) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if dual {
        sock.set_only_v6(false)?;
    }
    // Best effort: the kernel caps these at net.core.*mem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// One datagram for [`send_many`]: destination (in the socket's family),
/// the source IP to send from (`None`: the kernel picks), the bytes.
pub type OutDatagram<'a> = (SocketAddr, Option<std::net::IpAddr>, &'a [u8]);

/// Sends many small datagrams, each to its own address, in as few syscalls
/// as possible (`sendmmsg` on Linux, 64 at a time; the source IP goes in a
/// PKTINFO control message, as quinn does). Best effort: returns how many
/// the kernel took; the rest are dropped, as a full socket buffer would.
#[cfg(target_os = "linux")]
pub fn send_many(sock: &UdpSocket, msgs: &[OutDatagram<'_>]) -> usize {
    use std::os::fd::AsRawFd;
    let mut sent = 0;
    for chunk in msgs.chunks(64) {
        let addrs: Vec<socket2::SockAddr> = chunk
            .iter()
            .map(|(a, _, _)| socket2::SockAddr::from(*a))
            .collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, _, d)| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        // 8-byte aligned room for one PKTINFO control message each.
        let mut cmsgs = vec![[0u64; 8]; chunk.len()];
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(chunk.len());
        for (i, (_, src, _)) in chunk.iter().enumerate() {
            // SAFETY: an all-zero mmsghdr is valid; every pointer set here
            // (addrs, iovs, cmsgs) outlives the syscalls below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = addrs[i].len();
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if let Some(ip) = src {
                let buf = cmsgs[i].as_mut_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_control = buf;
                h.msg_hdr.msg_controllen = std::mem::size_of_val(&cmsgs[i]);
                // SAFETY: the control buffer is large and aligned enough for
                // one cmsghdr with an in6_pktinfo (the larger of the two).
                h.msg_hdr.msg_controllen = unsafe {
                    match ip.to_canonical() {
                        std::net::IpAddr::V4(v4) => put_cmsg(
                            &h.msg_hdr,
                            libc::IPPROTO_IP,
                            libc::IP_PKTINFO,
                            libc::in_pktinfo {
                                ipi_ifindex: 0,
                                ipi_spec_dst: libc::in_addr {
                                    s_addr: u32::from_ne_bytes(v4.octets()),
                                },
                                ipi_addr: libc::in_addr { s_addr: 0 },
                            },
                        ),
                        std::net::IpAddr::V6(v6) => put_cmsg(
                            &h.msg_hdr,
                            libc::IPPROTO_IPV6,
                            libc::IPV6_PKTINFO,
                            libc::in6_pktinfo {
                                ipi6_addr: libc::in6_addr {
                                    s6_addr: v6.octets(),
                                },
                                ipi6_ifindex: 0,
                            },
                        ),
                    }
                };
            }
            hdrs.push(h);
        }
        let mut off = 0;
        while off < hdrs.len() {
            // SAFETY: hdrs[off..] are initialised mmsghdrs pointing at live
            // buffers; the count matches the slice.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs[off..].as_mut_ptr(),
                    (hdrs.len() - off) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        sent += off;
        if off < chunk.len() {
            break;
        }
    }
    sent
}

/// Writes one control message carrying `value` at the start of `hdr`'s
/// control buffer; returns the control length to set.
///
/// # Safety
/// `hdr.msg_control` must point to a buffer aligned for `cmsghdr` and at
/// least `CMSG_SPACE(size_of::<T>())` long.
#[cfg(target_os = "linux")]
unsafe fn put_cmsg<T>(hdr: &libc::msghdr, level: libc::c_int, ty: libc::c_int, value: T) -> usize {
    let size = std::mem::size_of::<T>() as libc::c_uint;
    let c = libc::CMSG_FIRSTHDR(hdr);
    (*c).cmsg_level = level;
    (*c).cmsg_type = ty;
    (*c).cmsg_len = libc::CMSG_LEN(size) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut T, value);
    libc::CMSG_SPACE(size) as usize
}

/// Sends many small datagrams (one `send_to` each outside Linux; the
/// source IP is left to the OS).
#[cfg(not(target_os = "linux"))]
pub fn send_many(sock: &UdpSocket, msgs: &[OutDatagram<'_>]) -> usize {
    msgs.iter()
        .take_while(|(a, _, d)| sock.send_to(d, a).is_ok())
        .count()
}

/// Normalises IPv4-mapped IPv6 addresses (seen on dual-stack sockets) to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Endpoint settings used everywhere: a stateless-reset key that survives
/// restarts (so agents learn at their next packet that a restarted server
/// lost their connection), and no greasing of the QUIC fixed bit, which
/// keeps QUIC's first byte out of the range our probes use.
pub fn endpoint_config(reset_secret: [u8; 32]) -> quinn::EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_secret);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(key));
    cfg.grease_quic_bit(false);
    // quinn's default connection-id generator validates ids with a random
    // per-process key and drops packets with ids it did not make, which
    // would silence the stateless reset after a restart; derive that key
    // from the same secret so a restarted server recognises its old ids.
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"punch cid key".as_slice(), &reset_secret].concat(),
    );
    let cid_key = u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    cfg
}

/// Transport settings for long-lived signaling connections.
pub fn signal_transport(keep_alive: Option<Duration>, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keep_alive);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).expect("idle timeout in range"),
    ));
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Signaling is small: keep per-connection buffers small so a server
    // can hold many agents.
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((512u32 * 1024).into());
    t.send_window(512 * 1024);
    // Small messages need no batching, unreliable datagrams or path MTU
    // probes, and each costs memory per connection on a server holding
    // tens of thousands.
    t.enable_segmentation_offload(false);
    t.datagram_receive_buffer_size(None);
    t.mtu_discovery_config(None);
    t
}

/// The address to hand to a socket: IPv4 destinations become IPv4-mapped
/// IPv6 on an IPv6 (dual-stack) socket.
pub fn for_socket(addr: SocketAddr, ipv6_socket: bool) -> SocketAddr {
    match (addr, ipv6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => addr,
    }
}

/// Resolves on Ctrl-C or SIGTERM: the binaries' clean-shutdown trigger.
///
/// The SIGTERM handler is installed when this is called, not when the
/// future is first polled, and the future must be kept (created once, not
/// once per loop turn): a signal that arrives while no listener exists is
/// lost, and once tokio's handler is installed, SIGTERM no longer ends the
/// process by default.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let interrupt = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = interrupt => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = interrupt.await;
    }
}
