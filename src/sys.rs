//! Process set-up that talks to the OS directly: the crate's `unsafe` system calls outside
//! the data plane (getrlimit, setrlimit, kill, ioctl, setpriority), each with a `// SAFETY:` comment.
#![allow(unsafe_code)]

/// The soft open-files limit meshd asks for. Docker sets the hard limit near 10^9; nothing
/// is ever sized from either limit, this only lets the process hold that many sockets.
pub const NOFILE_TARGET: u64 = 1 << 20;

/// Raises the soft RLIMIT_NOFILE to `min(hard, NOFILE_TARGET)`; returns the limit in force.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = lim.rlim_max.min(NOFILE_TARGET as libc::rlim_t);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one rlimit struct through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    Ok(lim.rlim_cur as u64)
}

/// Sends `sig` to process `pid` (the demo's orchestrator and the tests signal their own
/// children with it: the one `kill(2)` call).
pub fn send_signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes two integers and reads no memory of ours.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to every process in process group `pgid` (`kill(-pgid, sig)`): a task and
/// the children it forked (`meshd demo`'s busybox httpd tasks fork one per connection).
pub fn signal_group(pgid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid).map_err(std::io::Error::other)?;
    if pgid <= 1 {
        return Err(std::io::Error::other("not a process group id"));
    }
    // SAFETY: kill(2) takes two integers and reads no memory of ours.
    if unsafe { libc::kill(-pgid, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the next byte to read from TCP socket `fd` is at the urgent mark
/// (`SIOCATMARK`). A read stops short there with bytes still queued. On error: `true`
/// (the caller then reads on instead of assuming the queue is empty).
pub fn at_urgent_mark(fd: std::os::fd::RawFd) -> bool {
    /// `<linux/sockios.h>` (the libc crate does not export it).
    const SIOCATMARK: libc::Ioctl = 0x8905;
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one c_int through the pointer, which points to `v`; an
    // invalid fd only makes the call fail.
    let r = unsafe { libc::ioctl(fd, SIOCATMARK, &mut v) };
    r != 0 || v != 0
}

/// Asks the kernel to report each datagram's destination address on UDP socket `fd`
/// (`IP_PKTINFO`, or `IPV6_RECVPKTINFO` when `v6`): a socket bound to a wildcard address
/// then knows which of the host's addresses a client sent to, and replies from it.
pub fn set_pktinfo(fd: std::os::fd::RawFd, v6: bool) -> std::io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int through a valid pointer of the given length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Room for one `in_pktinfo` or `in6_pktinfo` control message (both under 64 bytes with
/// their header), 8-byte aligned as `cmsghdr` requires.
type CmsgBuf = [u64; 8];

/// One datagram read from non-blocking UDP socket `fd` into `buf`: its length, sender, the
/// local address it was sent to (when `set_pktinfo` is on), and whether it was cut short
/// (longer than `buf`). No allocation: the address and control buffers are on the stack.
pub fn recv_with_dst(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr, Option<std::net::IpAddr>, bool)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut cmsg: CmsgBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: see above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    // SAFETY: every pointer in `msg` points to a live local (or `buf`) of the stated size;
    // the kernel writes at most those sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let from = sockaddr_to_std(&name)
        .ok_or_else(|| std::io::Error::other("datagram from a non-IP address"))?;
    let mut dst = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // `msg_controllen`; each header's data is read unaligned as the struct its
    // (level, type) names.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                dst = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                    u32::from_be(info.ipi_addr.s_addr),
                )));
            } else if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                dst = Some(std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                    info.ipi6_addr.s6_addr,
                )));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
    Ok((n as usize, from, dst, truncated))
}

/// Sends `data` to `to` from UDP socket `fd`, with source address `from` (an address of
/// this host the socket's wildcard bind covers) given as a `IP_PKTINFO` / `IPV6_PKTINFO`
/// control message. Non-blocking; no allocation.
pub fn send_from(
    fd: std::os::fd::RawFd,
    data: &[u8],
    to: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> std::io::Result<usize> {
    let to = socket2::SockAddr::from(to);
    let mut cmsg: CmsgBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE / CMSG_LEN only compute sizes; the header and its data are written
    // inside `cmsg`, which is large enough for either pktinfo struct (checked by the
    // assertion), at CMSG_FIRSTHDR's aligned position.
    unsafe {
        let (level, kind, len) = match from {
            std::net::IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                std::mem::size_of::<libc::in_pktinfo>(),
            ),
            std::net::IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                std::mem::size_of::<libc::in6_pktinfo>(),
            ),
        };
        let space = libc::CMSG_SPACE(len as u32) as usize;
        assert!(space <= std::mem::size_of::<CmsgBuf>());
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        match from {
            std::net::IpAddr::V4(ip) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
            std::net::IpAddr::V6(ip) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
        }
    }
    // SAFETY: `msg` points to `to`, `iov` (over `data`) and `cmsg`, all live for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// An IPv4 or IPv6 `sockaddr_storage` as a `SocketAddr`.
fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in (which fits in it).
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read_unaligned((s as *const libc::sockaddr_storage).cast()) };
            Some(std::net::SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read_unaligned((s as *const libc::sockaddr_storage).cast()) };
            Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The nice value of the threads that do the control plane's bulk work (see
/// [`spawn_background`]).
pub const BACKGROUND_NICE: libc::c_int = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`], once per thread (on
/// Linux a nice value belongs to a thread, not the process). Best effort: a failure only
/// leaves the thread at normal priority.
pub fn background_thread() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|l| {
        if !l.replace(true) {
            // SAFETY: gettid and setpriority take plain integers and touch no memory of
            // ours; PRIO_PROCESS with a thread ID changes only that thread.
            let r = unsafe {
                let tid = libc::gettid();
                libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
            };
            if r != 0 {
                tracing::debug!(
                    "cannot lower a background thread's priority: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// `spawn_blocking` for the control plane's bulk work (decoding a 15 MB `/tasks`
/// answer, comparing 10,000 tasks, building a table, freeing the old one), on a thread at
/// nice [`BACKGROUND_NICE`]. On a small machine that work shares the cores with the
/// runtime thread that moves bytes: at normal priority a connection arriving while it ran
/// waited for a core (benches/swarm-scale.py, docs/BENCHMARKS.md). A nice thread still
/// gets the CPU nobody else wants, and a share under contention (unlike SCHED_IDLE, which
/// a busy data plane could starve for good). tokio's blocking pool reuses threads, so a
/// thread lowered here stays lowered for the pool's other work (file reads at a reload, the
/// upgrade hand-off): none of it is latency-bound.
pub fn spawn_background<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        background_thread();
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's nice value (per thread on Linux).
    fn thread_nice() -> libc::c_int {
        // SAFETY: plain integers in, an integer out.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn background_jobs_run_at_a_lower_priority_and_the_runtime_thread_does_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let before = thread_nice();
        let (bg, again) = rt.block_on(async {
            let bg = spawn_background(thread_nice).await.expect("the job ran");
            // The same pool thread, lowered already: still nice.
            let again = spawn_background(thread_nice).await.expect("the job ran");
            (bg, again)
        });
        // Nice 10; only if the tests run at a nicer value already and without
        // CAP_SYS_NICE (raising a thread's priority back needs it) may it stay there.
        assert!(
            bg == BACKGROUND_NICE || (before > BACKGROUND_NICE && bg == before),
            "a background job ran at nice {bg} (the test thread: {before})"
        );
        assert_eq!(again, bg);
        assert_eq!(
            thread_nice(),
            before,
            "the calling thread keeps its priority"
        );
    }
}
