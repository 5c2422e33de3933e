//! Zero-copy forwarding with splice(2) through pooled pipes (Linux only).
//!
//! A pipe pair costs two file descriptors and ~64 KiB of kernel memory, so a connection holds
//! one only while bytes are moving: a direction takes a pipe from its thread's pool when its
//! source becomes readable, pushes what it read to the destination, and gives the pipe back
//! empty before it waits again. An idle connection therefore holds no pipe (Sozu's mistake of
//! keeping pipes per connection ran it out of descriptors at 9000 idle connections).
//!
//! The pool is thread-local: taking and returning a pipe is a `Vec` pop/push, with no lock.
//! A task may move between worker threads; a pipe taken on one thread and returned on another
//! simply changes pools (descriptors are process-wide).
//!
//! Invariant: a pipe goes back to a pool only when it is empty. A pipe that still holds bytes
//! (the destination failed mid-way) is closed instead, so no byte of one connection can ever
//! leak into another.
//!
//! This module holds the data plane's only `unsafe`: the raw `pipe2`, `splice`, `write` and
//! `fcntl` calls.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What pooled pipes are grown to with `F_SETPIPE_SZ` (the default is 64 KiB, 16 pages;
/// `/proc/sys/fs/pipe-max-size` caps it, 1 MiB by default). Fewer, larger splices per MiB.
pub const PIPE_SIZE: usize = 256 * 1024;

/// How many bytes one splice call asks for: a grown pipe's capacity. A pipe that could not
/// be grown simply takes less per call.
pub const CHUNK: usize = PIPE_SIZE;

/// At most this many grown pipes exist at once (64 x 64 pages = 4,096 pages). Pipe pages are
/// charged to the user: past `/proc/sys/fs/pipe-user-pages-soft` (16,384 pages by default)
/// an unprivileged user's new pipes get 2 pages (8 KiB) and growing fails, so grown pipes
/// stay within a quarter of that budget and the rest keep the default size.
const GROWN_MAX: usize = 64;

/// Grown pipes open now.
static GROWN: AtomicUsize = AtomicUsize::new(0);

/// Pipes kept per worker thread. Beyond this, returned pipes are closed.
const POOL_CAP: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe: bytes written to `w` are read from `r`.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Grown to `PIPE_SIZE` (counted in `GROWN`).
    grown: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.grown {
            GROWN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        super::stats::STATS
            .pipes_created
            .fetch_add(1, Ordering::Relaxed);
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let grown = GROWN.fetch_add(1, Ordering::Relaxed) < GROWN_MAX && grow(w.as_raw_fd());
        if !grown {
            GROWN.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Pipe { r, w, grown })
    }
}

/// Asks for a `PIPE_SIZE` pipe. Failure (EPERM past the user's pipe budget, a lower
/// `pipe-max-size`) leaves the pipe as it was, which works the same, only in smaller steps.
fn grow(fd: RawFd) -> bool {
    // SAFETY: fcntl(F_SETPIPE_SZ) takes a descriptor and an integer; it touches no memory of
    // ours. A wrong descriptor fails with EBADF.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
    rc >= PIPE_SIZE as libc::c_int
}

/// A pipe borrowed from the thread's pool. Dropped with `len == 0` it returns to the pool;
/// dropped holding bytes it is closed.
#[derive(Debug)]
pub struct PooledPipe {
    pipe: Option<Pipe>,
    /// Bytes spliced in and not yet spliced out.
    pub len: usize,
}

impl PooledPipe {
    /// Takes a pipe from this thread's pool, or creates one.
    pub fn take() -> io::Result<PooledPipe> {
        let pipe = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => p,
            None => Pipe::new()?,
        };
        Ok(PooledPipe {
            pipe: Some(pipe),
            len: 0,
        })
    }

    /// Moves up to `CHUNK` bytes from socket `src` into the pipe. `Ok(0)` is end of stream.
    pub fn fill_from(&mut self, src: RawFd) -> io::Result<usize> {
        let w = self.fds().1;
        let n = splice(src, w, CHUNK)?;
        self.len += n;
        Ok(n)
    }

    /// Copies `buf` into the pipe with one `write(2)`; returns how many bytes it took (an
    /// empty pipe takes at least its capacity: 64 KiB by default, 8 KiB for an unprivileged
    /// user past `/proc/sys/fs/pipe-user-pages-soft`). Used to park what a socket did not
    /// accept, so that the per-thread scratch buffer it came from is free again.
    pub fn fill_from_slice(&mut self, buf: &[u8]) -> io::Result<usize> {
        let w = self.fds().1;
        loop {
            // SAFETY: `buf` is a valid, readable slice of `buf.len()` bytes for the whole
            // call; write(2) only reads it. A wrong descriptor fails with EBADF.
            let n = unsafe { libc::write(w, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                self.len += n as usize;
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Moves bytes from the pipe into socket `dst`; returns how many moved.
    pub fn drain_to(&mut self, dst: RawFd) -> io::Result<usize> {
        let r = self.fds().0;
        let n = splice(r, dst, self.len)?;
        self.len -= n;
        Ok(n)
    }

    fn fds(&self) -> (RawFd, RawFd) {
        match &self.pipe {
            Some(p) => (p.r.as_raw_fd(), p.w.as_raw_fd()),
            // `pipe` is only taken in `drop`.
            None => (-1, -1),
        }
    }
}

impl Drop for PooledPipe {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            if self.len == 0 {
                POOL.with(|p| {
                    let mut p = p.borrow_mut();
                    if p.len() < POOL_CAP {
                        p.push(pipe);
                    }
                });
            }
            // else: `pipe` drops here and both descriptors close with the bytes in them.
        }
    }
}

/// One non-blocking splice(2) call. `EAGAIN` comes back as `WouldBlock`, which is what
/// tokio's `try_io` needs to clear the socket's readiness.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice takes two descriptors and null offsets (both ends are a pipe or a
        // socket, neither seekable); it touches no memory of ours. A closed or wrong
        // descriptor makes it fail with EBADF/EINVAL, which we return as an error.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether splice works between sockets here (it can be blocked by seccomp or be missing
/// under some emulators). Checked once at start; the forwarder falls back to a buffered copy.
pub fn probe() -> bool {
    let Ok(pipe) = Pipe::new() else { return false };
    let Ok((a, b)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    if std::io::Write::write_all(&mut &a, b"x").is_err() {
        return false;
    }
    splice(b.as_raw_fd(), pipe.w.as_raw_fd(), 1).is_ok_and(|n| n == 1)
        && splice(pipe.r.as_raw_fd(), a.as_raw_fd(), 1).is_ok_and(|n| n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn moves_bytes_and_pools_only_empty_pipes() {
        assert!(probe(), "splice should work on this Linux machine");
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        a.write_all(b"hello splice").unwrap();
        let mut p = PooledPipe::take().unwrap();
        let n = p.fill_from(b.as_raw_fd()).unwrap();
        assert_eq!(n, 12);
        assert_eq!(p.len, 12);
        let m = p.drain_to(c.as_raw_fd()).unwrap();
        assert_eq!(m, 12);
        assert_eq!(p.len, 0);
        let mut buf = [0u8; 12];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello splice");
        drop(p);
        let pooled = POOL.with(|p| p.borrow().len());
        assert!(pooled >= 1);

        // A pipe that still holds bytes is closed, not pooled.
        let before = POOL.with(|p| p.borrow().len());
        let mut p = PooledPipe::take().unwrap();
        a.write_all(b"left over").unwrap();
        p.fill_from(b.as_raw_fd()).unwrap();
        drop(p);
        let after = POOL.with(|p| p.borrow().len());
        assert_eq!(
            after,
            before - 1,
            "a non-empty pipe must not return to the pool"
        );
    }

    #[test]
    fn grown_pipes_have_their_size_and_take_a_scratch_buffer() {
        let mut p = PooledPipe::take().unwrap();
        let grown = p.pipe.as_ref().is_some_and(|p| p.grown);
        // SAFETY: F_GETPIPE_SZ reads nothing of ours.
        let size = unsafe { libc::fcntl(p.fds().1, libc::F_GETPIPE_SZ) };
        assert!(size > 0);
        if grown {
            assert_eq!(size as usize, PIPE_SIZE);
        }
        assert!(GROWN.load(Ordering::Relaxed) <= GROWN_MAX);
        let data: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(p.fill_from_slice(&data).unwrap(), data.len());
        assert_eq!(p.len, data.len());
        let (c, mut d) = UnixStream::pair().unwrap();
        assert_eq!(p.drain_to(c.as_raw_fd()).unwrap(), data.len());
        assert_eq!(p.len, 0);
        let mut out = vec![0u8; data.len()];
        d.read_exact(&mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn empty_socket_is_would_block() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut p = PooledPipe::take().unwrap();
        let e = p.fill_from(b.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
