//! Makes the unix socket answer standard gRPC clients whose `:authority` the `h2` crate refuses.
//!
//! grpc-core since 1.57 (Python, C++, Ruby) sends the %-encoded socket path as `:authority` on a `unix:` channel,
//! grpc-java the raw path; `h2` parses `:authority` as a URI authority and resets every such stream with
//! PROTOCOL_ERROR (hyperium/h2 pull 487 is still open). No client should have to override it, so the unix listener
//! reads each connection through [`AuthorityFix`]: a small HTTP/2 frame filter on the client-to-server direction
//! that HPACK-decodes every header block (keeping the client's dynamic table), replaces an `:authority` that does
//! not parse with `localhost` (what grpc-go sends and what it means on a local socket), and re-encodes the block
//! with literals that never enter the server's table, so the two tables cannot drift apart. Every other frame and
//! the whole server-to-client direction pass byte for byte. A malformed stream ends the connection, as `h2` would.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;
use tonic::transport::server::Connected;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (RFC 9113 §4.2): re-encoded blocks are cut into frames this big.
const MAX_FRAME: usize = 16_384;
/// The HPACK table size the server announces (h2's default, unchanged by tonic): the most a client may use.
const TABLE_SIZE: usize = 4096;
/// A bigger header block than this ends the connection; the server's own header-list limit is far below it.
const MAX_BLOCK: usize = 1 << 20;
/// What a local caller's `:authority` becomes when `h2` would refuse it.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("HTTP/2 frame of type {kind:#x} inside a header block")]
    InterruptedBlock { kind: u8 },
    #[error("CONTINUATION frame outside a header block")]
    StrayContinuation,
    #[error("header block over {MAX_BLOCK} bytes")]
    BlockTooBig,
    #[error("malformed HEADERS frame padding or priority")]
    BadPadding,
    #[error("HPACK: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// An open header block: a HEADERS frame whose CONTINUATION frames are still to come.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

#[derive(Clone, Copy)]
enum State {
    /// Bytes of the client connection preface still to pass.
    Preface(usize),
    /// Waiting for a frame header.
    Frame,
    /// Bytes of a frame payload still to pass unchanged.
    Passthrough(usize),
}

/// The sans-I/O filter: bytes from the client in, bytes for the server out.
pub struct Filter {
    decoder: loona_hpack::Decoder<'static>,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    block: Option<Block>,
}

impl Default for Filter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self { decoder, state: State::Preface(PREFACE_LEN), input: Vec::new(), output: Vec::new(), block: None }
    }
}

impl Filter {
    /// Feeds bytes read from the client; what may go to the server is then in [`Filter::output`].
    pub fn push(&mut self, data: &[u8]) -> Result<(), FilterError> {
        self.input.extend_from_slice(data);
        let mut at = 0;
        loop {
            let available = self.input.len() - at;
            match self.state {
                State::Preface(left) | State::Passthrough(left) => {
                    let n = left.min(available);
                    if n == 0 && left > 0 {
                        break;
                    }
                    self.output.extend_from_slice(&self.input[at..at + n]);
                    at += n;
                    self.state = match self.state {
                        State::Preface(_) if left == n => State::Frame,
                        State::Preface(_) => State::Preface(left - n),
                        _ if left == n => State::Frame,
                        _ => State::Passthrough(left - n),
                    };
                }
                State::Frame => {
                    if available < FRAME_HEADER_LEN {
                        break;
                    }
                    let header = &self.input[at..at + FRAME_HEADER_LEN];
                    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream = [header[5], header[6], header[7], header[8]];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(FilterError::InterruptedBlock { kind });
                        }
                        self.output.extend_from_slice(header);
                        at += FRAME_HEADER_LEN;
                        self.state = State::Passthrough(len);
                        continue;
                    }
                    if len > MAX_BLOCK {
                        return Err(FilterError::BlockTooBig);
                    }
                    if available < FRAME_HEADER_LEN + len {
                        break;
                    }
                    let payload = self.input[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len].to_vec();
                    at += FRAME_HEADER_LEN + len;
                    self.frame(kind, flags, stream, payload)?;
                }
            }
        }
        self.input.drain(..at);
        Ok(())
    }

    /// Bytes ready for the server; the caller takes what it can with [`Filter::consume`].
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    pub fn consume(&mut self, n: usize) {
        self.output.drain(..n);
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: [u8; 4], payload: Vec<u8>) -> Result<(), FilterError> {
        if kind == CONTINUATION {
            let block = self.block.as_mut().filter(|b| b.stream == stream).ok_or(FilterError::StrayContinuation)?;
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(FilterError::BlockTooBig);
            }
            block.fragment.extend_from_slice(&payload);
        } else {
            if self.block.is_some() {
                return Err(FilterError::InterruptedBlock { kind });
            }
            let mut body = &payload[..];
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, rest) = body.split_first().ok_or(FilterError::BadPadding)?;
                pad = usize::from(n);
                body = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let bytes: [u8; 5] = body.get(..5).and_then(|b| b.try_into().ok()).ok_or(FilterError::BadPadding)?;
                priority = Some(bytes);
                body = &body[5..];
            }
            let fragment = body.get(..body.len().checked_sub(pad).ok_or(FilterError::BadPadding)?).unwrap_or(&[]);
            self.block =
                Some(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: fragment.to_vec() });
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block is open");
            self.emit(block)?;
        }
        Ok(())
    }

    /// Decodes a complete header block and writes it again as HEADERS (+ CONTINUATION) frames.
    fn emit(&mut self, block: Block) -> Result<(), FilterError> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                    LOCAL_AUTHORITY
                } else {
                    &value
                };
                // Literal Header Field without Indexing, New Name (RFC 7541 §6.2.2): the server's table stays empty.
                encoded.push(0);
                encode_string(&name, &mut encoded);
                encode_string(value, &mut encoded);
            })
            .map_err(FilterError::Hpack)?;

        let first_room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        self.frame_header(priority.len() + first.len(), HEADERS, flags, block.stream);
        self.output.extend_from_slice(priority);
        self.output.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(MAX_FRAME.min(rest.len()));
            self.frame_header(chunk.len(), CONTINUATION, if tail.is_empty() { END_HEADERS } else { 0 }, block.stream);
            self.output.extend_from_slice(chunk);
            rest = tail;
        }
        Ok(())
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream: [u8; 4]) {
        let len = u32::try_from(len).expect("frames are cut at MAX_FRAME").to_be_bytes();
        self.output.extend_from_slice(&len[1..]);
        self.output.extend_from_slice(&[kind, flags]);
        self.output.extend_from_slice(&stream);
    }
}

/// An HPACK string literal without Huffman coding (RFC 7541 §5.2).
fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    encode_integer(bytes.len(), 7, 0, out);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn encode_integer(mut value: usize, prefix: u32, first_bits: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first_bits | value as u8);
        return;
    }
    out.push(first_bits | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A unix connection read through the [`Filter`]; writes go straight to the socket.
pub struct AuthorityFix<S> {
    inner: S,
    filter: Filter,
    buffer: Box<[u8]>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, filter: Filter::default(), buffer: vec![0; 16 * 1024].into_boxed_slice(), eof: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ready = this.filter.output();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.filter.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.buffer);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            let filled = read.filled().len();
            this.filter
                .push(&this.buffer[..filled])
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits the filter's output into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    fn request(path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "%2Frun%2Fquantix%2Fnode.sock")]
            .into_iter()
            .chain([("te", "trailers"), ("content-type", "application/grpc")])
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn decoded(decoder: &mut loona_hpack::Decoder, block: &[u8]) -> Vec<(String, String)> {
        let fields = decoder.decode(block).unwrap();
        fields.into_iter().map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())).collect()
    }

    #[test]
    fn a_percent_encoded_authority_becomes_localhost_also_when_indexed() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                             // The second request refers to the client's dynamic table.
        for (stream, path) in [(1, "/a.B/C"), (3, "/a.B/D")] {
            let headers = request(path);
            let block = encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        let mut filter = Filter::default();
        // Byte by byte: frames cut anywhere still come out whole.
        for byte in &input {
            filter.push(std::slice::from_ref(byte)).unwrap();
        }
        let output = filter.output().to_vec();
        assert_eq!(&output[..24], PREFACE);
        let frames = frames(&output[24..]);
        assert_eq!(frames.len(), 5);
        assert_eq!((frames[0].0, frames[0].3.len()), (0x4, 0));
        let mut server = loona_hpack::Decoder::new();
        for (i, stream, path) in [(1, 1, "/a.B/C"), (3, 3, "/a.B/D")] {
            let (kind, flags, _, block) = &frames[i];
            assert_eq!((*kind, *flags), (HEADERS, END_HEADERS));
            let fields = decoded(&mut server, block);
            assert!(fields.contains(&(":authority".into(), "localhost".into())), "{fields:?}");
            assert!(fields.contains(&(":path".into(), path.into())), "{fields:?}");
            assert_eq!(fields.len(), 6);
            assert_eq!(frames[i + 1], (0x0, END_STREAM, stream, b"\0\0\0\0\0".to_vec()));
        }
    }

    #[test]
    fn a_valid_authority_padding_priority_and_continuations_are_kept() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = "x".repeat(20_000);
        let headers = [(&b":authority"[..], &b"node1:7443"[..]), (b"x-big", big.as_bytes())];
        let block = encoder.encode(headers.iter().copied());
        let mut first = vec![3u8]; // pad length
        first.extend_from_slice(&[0x80, 0, 0, 1, 15]); // priority
        first.extend_from_slice(&block[..100]);
        first.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_STREAM | PADDED | PRIORITY, 5, &first));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &block[100..]));
        let mut filter = Filter::default();
        filter.push(&input).unwrap();
        let frames = frames(&filter.output()[24..]);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, END_STREAM | PRIORITY);
        assert_eq!(&frames[0].3[..5], &[0x80, 0, 0, 1, 15]);
        assert_eq!((frames[1].0, frames[1].1, frames[1].2), (CONTINUATION, END_HEADERS, 5));
        let block = [&frames[0].3[5..], &frames[1].3[..]].concat();
        let fields = decoded(&mut loona_hpack::Decoder::new(), &block);
        assert_eq!(fields, vec![(":authority".into(), "node1:7443".into()), ("x-big".into(), big)]);
    }

    #[test]
    fn a_frame_inside_a_header_block_ends_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(Filter::default().push(&input), Err(FilterError::InterruptedBlock { kind: 0 })));
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        assert!(matches!(Filter::default().push(&input), Err(FilterError::StrayContinuation)));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert!(matches!(Filter::default().push(&input), Err(FilterError::BadPadding)));
    }

    #[test]
    fn integers_use_the_continuation_bytes_of_rfc_7541() {
        let mut out = Vec::new();
        encode_integer(1337, 5, 0, &mut out);
        assert_eq!(out, [31, 154, 10]);
        out.clear();
        encode_integer(10, 7, 0, &mut out);
        assert_eq!(out, [10]);
    }
}
