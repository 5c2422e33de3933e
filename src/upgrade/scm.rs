//! Descriptors over a UNIX socket (SCM_RIGHTS). The hand-off socket is `SOCK_SEQPACKET`:
//! one `sendmsg` is one message, so a frame and the descriptors it names arrive together
//! and never merged with the next (a stream socket may split or join payloads around the
//! ancillary data).
//!
//! Written on `nix`'s `sendmsg`/`recvmsg` rather than a crate that hides the flags: every
//! received descriptor must be close-on-exec from the start (`MSG_CMSG_CLOEXEC`: the new
//! process spawns health checks and, later, its own successor), owned at once so that no
//! error path leaks one (sozu#1342 closed an inherited socket on such a path), and a
//! truncated control message (`MSG_CTRUNC`: the kernel dropped descriptors) is an error.

#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The largest frame (JSON) of the hand-off protocol.
pub const MAX_FRAME: usize = 64 * 1024;
/// Descriptors per message: below the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS: usize = 200;

/// Sends one message: `frame`, with `fds` attached (they stay open here).
pub fn send(sock: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if frame.len() > MAX_FRAME || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "hand-off message too large",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(frame)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if n != frame.len() {
        return Err(io::Error::other("hand-off message sent in part"));
    }
    Ok(())
}

/// Receives one message: its frame and the descriptors that came with it, each already
/// owned (closed on drop) and close-on-exec. An empty frame with no descriptors is the
/// peer's end of stream.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(v) = c {
                for fd in v {
                    // SAFETY: the kernel just installed `fd` in this process for this
                    // message; nothing else refers to it, so it gets exactly one owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "hand-off message truncated: descriptors were lost",
        ));
    }
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::other("hand-off frame too large"));
    }
    buf.truncate(bytes);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn frames_and_descriptors_arrive_together_and_close_on_exec() {
        let (a, b) =
            socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(a.as_fd(), b"one", &[l1.as_fd(), l2.as_fd()]).unwrap();
        send(a.as_fd(), b"two", &[]).unwrap();
        let (f, fds) = recv(b.as_fd()).unwrap();
        assert_eq!(f, b"one");
        assert_eq!(fds.len(), 2);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), l1.local_addr().unwrap());
        // SAFETY: fcntl F_GETFD on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let (f, fds) = recv(b.as_fd()).unwrap();
        assert_eq!((f.as_slice(), fds.len()), (&b"two"[..], 0));
        drop(a);
        let (f, fds) = recv(b.as_fd()).unwrap();
        assert!(f.is_empty() && fds.is_empty(), "end of stream");
    }
}
