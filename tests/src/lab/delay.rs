//! A userspace link with delay and jitter: this kernel has no `tc netem`,
//! so a namespace between a site and the internet runs this forwarder,
//! which copies every Ethernet frame between two interfaces (AF_PACKET)
//! after the configured delay, keeping order.

use anyhow::{bail, Result};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct RawSock(i32);

impl RawSock {
    fn open(ifname: &str) -> Result<RawSock> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned by RawSock.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let sock = RawSock(fd);
        let cname = std::ffi::CString::new(ifname)?;
        // SAFETY: cname is a valid C string.
        let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if idx == 0 {
            bail!("no interface {ifname}");
        }
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = idx as i32;
        // SAFETY: sll is a properly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            bail!("bind {ifname}: {}", std::io::Error::last_os_error());
        }
        // Do not see the frames we send ourselves.
        let one: i32 = 1;
        // SAFETY: valid option pointer and length.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                &one as *const i32 as *const libc::c_void,
                4,
            );
        }
        Ok(sock)
    }

    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is valid for reads of its length.
        unsafe {
            libc::send(
                self.0,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            );
        }
    }
}

impl Drop for RawSock {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe {
            libc::close(self.0);
        }
    }
}

type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

/// Most frames held per direction; beyond it frames are dropped (a full
/// link buffer), so memory stays bounded.
const MAX_QUEUED: usize = 10_000;

fn direction(from: Arc<RawSock>, to: Arc<RawSock>, delay: Duration, jitter: Duration) {
    let q: Queue = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
    let sender_q = q.clone();
    std::thread::spawn(move || loop {
        let (lock, cv) = &*sender_q;
        let mut g = lock.lock().expect("not poisoned");
        while g.is_empty() {
            g = cv.wait(g).expect("not poisoned");
        }
        let due = g.front().expect("non-empty").0;
        let now = Instant::now();
        if due > now {
            let (g2, _) = cv.wait_timeout(g, due - now).expect("not poisoned");
            drop(g2);
            continue;
        }
        let (_, frame) = g.pop_front().expect("non-empty");
        drop(g);
        to.send(&frame);
    });
    let mut buf = vec![0u8; 65536];
    let mut last_due = Instant::now();
    loop {
        let Ok(n) = from.recv(&mut buf) else { continue };
        let j = if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(rand::random::<f64>())
        };
        // Never reorder: a frame leaves no earlier than the one before it.
        let due = (Instant::now() + delay + j).max(last_due);
        last_due = due;
        let (lock, cv) = &*q;
        let mut g = lock.lock().expect("not poisoned");
        if g.len() < MAX_QUEUED {
            g.push_back((due, buf[..n].to_vec()));
            cv.notify_one();
        }
    }
}

/// Forwards frames between interfaces `a` and `b` forever.
pub fn forward(a: &str, b: &str, delay_ms: u32, jitter_ms: u32) -> Result<()> {
    let sa = Arc::new(RawSock::open(a)?);
    let sb = Arc::new(RawSock::open(b)?);
    let delay = Duration::from_millis(delay_ms as u64);
    let jitter = Duration::from_millis(jitter_ms as u64);
    println!("forwarding {a} <-> {b} with {delay_ms} ms delay, {jitter_ms} ms jitter");
    let (sa2, sb2) = (sa.clone(), sb.clone());
    std::thread::spawn(move || direction(sa2, sb2, delay, jitter));
    direction(sb, sa, delay, jitter);
    Ok(())
}
