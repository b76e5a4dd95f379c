//! Sending a file descriptor with `SCM_RIGHTS` on the QMP socket.
//!
//! QEMU takes the descriptors that arrived with the bytes of a command as that command's fds (`getfd`, `add-fd`,
//! and the `fdname` arguments of other commands), so the descriptor must ride on the same `sendmsg` as the
//! command's first byte. The rest of the command may follow with ordinary writes.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
#[cfg(test)]
use std::os::fd::OwnedFd;

#[cfg(test)]
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Sends a prefix of `bytes` (at least one byte) with `fd` attached, waiting for the socket to be writable.
/// Returns how many bytes went out; the caller writes the rest.
pub(crate) async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file descriptor needs at least one byte to ride on",
        ));
    }
    stream
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("SCM_RIGHTS control message does not fit its buffer"));
            }
            // NOSIGNAL: a peer that went away must be an EPIPE error here, not a SIGPIPE for the whole daemon.
            let sent = rustix::net::sendmsg(stream, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
            Ok(sent)
        })
        .await
}

/// Receives bytes and any descriptors that came with them, as QEMU does.
#[cfg(test)]
pub(crate) async fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    stream
        .async_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                stream,
                &mut [std::io::IoSliceMut::new(buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = message {
                    fds.extend(rights);
                }
            }
            Ok((received.bytes, fds))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn fd_arrives_with_the_first_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_read, _pipe_write) = rustix::pipe::pipe().unwrap();
        let sent = send_with_fd(&a, b"hello\n", pipe_read.as_fd()).await.unwrap();
        assert_eq!(sent, 6);

        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(&b, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        let ours = rustix::fs::fstat(&pipe_read).unwrap();
        let theirs = rustix::fs::fstat(&fds[0]).unwrap();
        assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
    }

    #[tokio::test]
    async fn empty_message_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (pipe_read, _pipe_write) = rustix::pipe::pipe().unwrap();
        let err = send_with_fd(&a, b"", pipe_read.as_fd()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
