//! Process set-up that talks to the OS directly: the crate's `unsafe` system calls outside
//! the data plane (getrlimit, setrlimit, kill, ioctl), each with a `// SAFETY:` comment.
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
