//! A minimal RESP2 client: what the Redis baseline needs and nothing more.
//!
//! ```text
//!  RespWriter (write half)                      RespReader (read half)
//!  queue GET/DEL/any command ─▶ one buffer       4 KiB read-ahead for reply lines
//!  flush ─▶ one write                            "+OK"  ":1"  "-ERR .."  "$-1"
//!  set(key, value) ─▶ one vectored write:        "$N\r\n" ─▶ the buffered part of the payload
//!     [queued + SET header | value | CRLF]              is copied (< 4 KiB), the rest is read
//!     (the value is never copied in user space)         straight into the caller's buffer
//! ```
//!
//! The two halves are independent, so several requests can be in flight on one connection:
//! one task writes, another reads the replies in order. Reply parsing is bounds-checked: a
//! malformed, oversized or truncated reply is a [`RespError`], never a panic.

use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read-ahead buffer: the longest reply line accepted, and the most payload bytes that are
/// copied out of it (the rest of a bulk reply is read in place).
const HEAD: usize = 4096;

/// Why a request or reply failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RespError {
    /// The connection ended (`mid-reply` or before a reply started).
    #[error("the server closed the connection {0}")]
    Closed(&'static str),
    /// A reply line without CRLF within the read-ahead buffer.
    #[error("a reply line longer than {HEAD} bytes")]
    LineTooLong,
    /// A line ending in a bare LF, or an empty line.
    #[error("a malformed reply line: {0:?}")]
    BadLine(String),
    /// A reply type this client does not speak (arrays, RESP3 types, garbage).
    #[error("unexpected reply type {0:?}")]
    UnknownType(char),
    /// An integer or length that is not a decimal i64.
    #[error("not an integer: {0:?}")]
    BadInteger(String),
    /// A bulk length below -1.
    #[error("bulk length {0}")]
    BadLength(i64),
    /// A bulk reply larger than the caller's buffer.
    #[error("a {len}-byte bulk reply does not fit the {capacity}-byte buffer")]
    TooLarge { len: u64, capacity: usize },
    /// A bulk payload not followed by CRLF.
    #[error("bulk payload not terminated by CRLF")]
    BadBulkEnd,
    /// The server answered with an error.
    #[error("server error: {0}")]
    Server(String),
    /// A valid reply, but not the one the request calls for.
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One reply. `Simple` borrows the reader's buffer; a bulk reply's payload is in the
/// caller's buffer: its first `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    Simple(&'a [u8]),
    Integer(i64),
    Bulk(usize),
    Nil,
}

impl Reply<'_> {
    /// For error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Reply::Simple(s) => format!("+{}", String::from_utf8_lossy(s)),
            Reply::Integer(n) => format!(":{n}"),
            Reply::Bulk(n) => format!("a {n}-byte bulk"),
            Reply::Nil => "nil".to_string(),
        }
    }

    /// `Ok` when this is the status `want` (e.g. `b"OK"`).
    pub(crate) fn expect_simple(&self, want: &'static str) -> Result<(), RespError> {
        match self {
            Reply::Simple(s) if *s == want.as_bytes() => Ok(()),
            other => Err(RespError::Unexpected {
                expected: want,
                got: other.describe(),
            }),
        }
    }
}

/// What a reply line says (the line without its CRLF).
#[derive(Debug, PartialEq, Eq)]
enum Head<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Integer(i64),
    Bulk(Option<u64>),
}

fn parse_int(digits: &[u8]) -> Result<i64, RespError> {
    let bad = || RespError::BadInteger(String::from_utf8_lossy(digits).into_owned());
    let (negative, digits_only) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits_only.is_empty() || digits_only.len() > 19 {
        return Err(bad());
    }
    let mut value: i64 = 0;
    for &d in digits_only {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        let digit = i64::from(d - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| {
                if negative {
                    v.checked_sub(digit)
                } else {
                    v.checked_add(digit)
                }
            })
            .ok_or_else(bad)?;
    }
    Ok(value)
}

fn parse_head(line: &[u8]) -> Result<Head<'_>, RespError> {
    let Some((&kind, rest)) = line.split_first() else {
        return Err(RespError::BadLine(String::new()));
    };
    match kind {
        b'+' => Ok(Head::Simple(rest)),
        b'-' => Ok(Head::Error(rest)),
        b':' => Ok(Head::Integer(parse_int(rest)?)),
        b'$' => match parse_int(rest)? {
            -1 => Ok(Head::Bulk(None)),
            n if n < 0 => Err(RespError::BadLength(n)),
            n => Ok(Head::Bulk(Some(n as u64))),
        },
        other => Err(RespError::UnknownType(char::from(other))),
    }
}

/// The read half: replies in order.
#[derive(Debug)]
pub(crate) struct RespReader<R> {
    inner: R,
    buf: Box<[u8; HEAD]>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> RespReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Box::new([0; HEAD]),
            start: 0,
            end: 0,
        }
    }

    /// Reads more bytes into the buffer (moving what is left to its front when needed).
    async fn fill_more(&mut self, what: &'static str) -> Result<(), RespError> {
        if self.end == HEAD {
            if self.start == 0 {
                return Err(RespError::LineTooLong);
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(RespError::Closed(what));
        }
        self.end += n;
        Ok(())
    }

    /// The next line: returns the end of its content (the CR) and consumes it with its CRLF.
    async fn line(&mut self) -> Result<(usize, usize), RespError> {
        // Pending bytes already searched for LF.
        let mut scanned = 0;
        loop {
            let from = self.start + scanned;
            if let Some(i) = self.buf[from..self.end].iter().position(|&b| b == b'\n') {
                let lf = from + i;
                let start = self.start;
                if lf == start || self.buf[lf - 1] != b'\r' {
                    let line = String::from_utf8_lossy(&self.buf[start..=lf]).into_owned();
                    return Err(RespError::BadLine(line));
                }
                self.start = lf + 1;
                return Ok((start, lf - 1));
            }
            scanned = self.end - self.start;
            let what = if scanned == 0 {
                "before a reply"
            } else {
                "mid-reply"
            };
            self.fill_more(what).await?;
        }
    }

    /// Reads one reply. A bulk payload goes into `dest` (its first `len` bytes); an error
    /// reply is [`RespError::Server`].
    pub(crate) async fn reply(&mut self, dest: &mut [u8]) -> Result<Reply<'_>, RespError> {
        let (start, end) = self.line().await?;
        let head = parse_head(&self.buf[start..end])?;
        let len = match head {
            Head::Simple(_) => return Ok(Reply::Simple(&self.buf[start + 1..end])),
            Head::Error(message) => {
                return Err(RespError::Server(
                    String::from_utf8_lossy(message).into_owned(),
                ))
            }
            Head::Integer(n) => return Ok(Reply::Integer(n)),
            Head::Bulk(None) => return Ok(Reply::Nil),
            Head::Bulk(Some(len)) => len,
        };
        let n = match usize::try_from(len) {
            Ok(n) if n <= dest.len() => n,
            _ => {
                return Err(RespError::TooLarge {
                    len,
                    capacity: dest.len(),
                })
            }
        };
        // What was read ahead (at most HEAD bytes), then the rest straight into `dest`.
        let buffered = n.min(self.end - self.start);
        dest[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if buffered < n {
            self.inner
                .read_exact(&mut dest[buffered..n])
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => RespError::Closed("mid-reply"),
                    _ => RespError::Io(e),
                })?;
        }
        while self.end - self.start < 2 {
            self.fill_more("mid-reply").await?;
        }
        if self.buf[self.start..self.start + 2] != *b"\r\n" {
            return Err(RespError::BadBulkEnd);
        }
        self.start += 2;
        Ok(Reply::Bulk(n))
    }
}

/// Appends one command's array header and its arguments as bulk strings; `value_len`, when
/// given, is the length of one more argument whose bytes the caller writes after this
/// (followed by CRLF).
fn encode(out: &mut Vec<u8>, args: &[&[u8]], value_len: Option<usize>) {
    use std::io::Write as _;
    let count = args.len() + usize::from(value_len.is_some());
    // Writing into a Vec cannot fail.
    let _ = write!(out, "*{count}\r\n");
    for arg in args {
        let _ = write!(out, "${}\r\n", arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = value_len {
        let _ = write!(out, "${len}\r\n");
    }
}

/// The write half: commands are queued in one buffer and written together.
#[derive(Debug)]
pub(crate) struct RespWriter<W> {
    inner: W,
    queued: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> RespWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            queued: Vec::with_capacity(HEAD),
        }
    }

    /// Queues a command (sent by the next [`RespWriter::flush`] or [`RespWriter::set`]).
    pub(crate) fn queue(&mut self, args: &[&[u8]]) {
        encode(&mut self.queued, args, None);
    }

    /// Writes the queued commands.
    pub(crate) async fn flush(&mut self) -> Result<(), RespError> {
        if !self.queued.is_empty() {
            self.inner.write_all(&self.queued).await?;
            self.queued.clear();
        }
        Ok(())
    }

    /// Writes the queued commands and `SET key value`, as one vectored write of the queued
    /// bytes with the SET header, `value` in place, and CRLF.
    pub(crate) async fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), RespError> {
        encode(&mut self.queued, &[b"SET", key], Some(value.len()));
        let mut slices = [
            IoSlice::new(&self.queued),
            IoSlice::new(value),
            IoSlice::new(b"\r\n"),
        ];
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = self.inner.write_vectored(rest).await?;
            if n == 0 {
                return Err(RespError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        self.queued.clear();
        Ok(())
    }
}

/// A key `prefix` + decimal `seq`, formatted without allocating.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    buf: [u8; 40],
    len: usize,
}

impl Key {
    /// `prefix` (at most 20 bytes; longer is cut) followed by `seq`.
    pub(crate) fn new(prefix: &str, seq: u64) -> Self {
        use std::io::Write as _;
        let mut buf = [0u8; 40];
        let prefix = &prefix.as_bytes()[..prefix.len().min(20)];
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut cursor = std::io::Cursor::new(&mut buf[prefix.len()..]);
        // 20 digits at most: always fits.
        let _ = write!(cursor, "{seq}");
        let len = prefix.len() + cursor.position() as usize;
        Self { buf, len }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its bytes at most `chunk` at a time (then EOF).
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .chunk
                .min(buf.remaining())
                .min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Every reply in `data`, read with every chunk size in `chunks`, as descriptions (a bulk
    /// as its payload text); the first error ends the list as `Err`.
    fn replies(data: &[u8], chunk: usize, capacity: usize) -> Vec<Result<String, String>> {
        block_on(async {
            let mut reader = RespReader::new(Chunked {
                data: data.to_vec(),
                at: 0,
                chunk,
            });
            let mut dest = vec![0u8; capacity];
            let mut out = Vec::new();
            loop {
                match reader.reply(&mut dest).await {
                    Ok(Reply::Bulk(n)) => {
                        out.push(Ok(format!("${}", String::from_utf8_lossy(&dest[..n]))))
                    }
                    Ok(other) => out.push(Ok(other.describe())),
                    Err(RespError::Closed("before a reply")) => return out,
                    Err(e) => {
                        out.push(Err(e.to_string()));
                        return out;
                    }
                }
            }
        })
    }

    #[test]
    fn good_replies_at_every_chunk_size() {
        let data = b"+OK\r\n:1\r\n:-42\r\n$5\r\nhello\r\n$0\r\n\r\n$-1\r\n+PONG\r\n$2\r\n\r\n\r\n";
        let want: Vec<Result<String, String>> =
            ["+OK", ":1", ":-42", "$hello", "$", "nil", "+PONG", "$\r\n"]
                .iter()
                .map(|s| Ok(s.to_string()))
                .collect();
        for chunk in [1, 2, 3, 7, 4096] {
            assert_eq!(replies(data, chunk, 16), want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_large_bulk_is_read_into_the_callers_buffer() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut data = format!("${}\r\n", payload.len()).into_bytes();
        data.extend_from_slice(&payload);
        data.extend_from_slice(b"\r\n:1\r\n");
        for chunk in [1000, 65536] {
            block_on(async {
                let mut reader = RespReader::new(Chunked {
                    data: data.clone(),
                    at: 0,
                    chunk,
                });
                let mut dest = vec![0u8; 200_000];
                assert_eq!(reader.reply(&mut dest).await.unwrap(), Reply::Bulk(100_000));
                assert_eq!(&dest[..100_000], &payload[..]);
                assert_eq!(reader.reply(&mut dest).await.unwrap(), Reply::Integer(1));
            });
        }
    }

    #[test]
    fn bad_replies_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"-ERR wrong type\r\n", "server error: ERR wrong type"),
            (b"!oops\r\n", "unexpected reply type '!'"),
            (b"*2\r\n", "unexpected reply type '*'"),
            (b":12x\r\n", "not an integer"),
            (b":\r\n", "not an integer"),
            (b":99999999999999999999\r\n", "not an integer"),
            (b"$-2\r\n", "bulk length -2"),
            (b"$abc\r\n", "not an integer"),
            (b"$3\r\nabcXY", "not terminated by CRLF"),
            (
                b"$20\r\n01234567890123456789\r\n",
                "does not fit the 16-byte buffer",
            ),
            (b"+OK\n", "malformed reply line"),
            (b"\r\n", "malformed reply line"),
        ];
        for (data, want) in cases {
            for chunk in [1, 4096] {
                let got = replies(data, chunk, 16);
                let last = got.last().cloned().unwrap_or(Ok("nothing".into()));
                assert!(
                    matches!(&last, Err(e) if e.contains(want)),
                    "{:?} (chunk {chunk}): {got:?}, want {want:?}",
                    String::from_utf8_lossy(data)
                );
            }
        }
        let long = vec![b'+'; HEAD + 10];
        let got = replies(&long, 4096, 16);
        assert!(matches!(got.last(), Some(Err(e)) if e.contains("longer than")));
    }

    #[test]
    fn truncated_replies_are_errors() {
        let full = b"$5\r\nhello\r\n";
        for cut in 1..full.len() {
            for chunk in [1, 4096] {
                let got = replies(&full[..cut], chunk, 16);
                assert!(
                    matches!(got.last(), Some(Err(e)) if e.contains("closed the connection mid-reply")),
                    "cut {cut} chunk {chunk}: {got:?}"
                );
            }
        }
        let got = replies(b"+OK", 4096, 16);
        assert!(matches!(got.last(), Some(Err(e)) if e.contains("mid-reply")));
    }

    #[test]
    fn commands_are_encoded_as_resp_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET", Key::new("frame:", 12).as_bytes()], None);
        encode(&mut out, &[b"SET", b"k"], Some(3));
        assert_eq!(
            out,
            b"*2\r\n$3\r\nGET\r\n$8\r\nframe:12\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n"
        );
        assert_eq!(
            Key::new("frame:", u64::MAX).as_bytes(),
            b"frame:18446744073709551615"
        );
    }

    #[test]
    fn set_writes_header_value_and_crlf() {
        block_on(async {
            let mut writer = RespWriter::new(Vec::new());
            writer.queue(&[b"DEL", b"a"]);
            writer.set(b"b", b"xyz").await.unwrap();
            writer.queue(&[b"PING"]);
            writer.flush().await.unwrap();
            assert_eq!(
                writer.inner,
                b"*2\r\n$3\r\nDEL\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$3\r\nxyz\r\n\
                  *1\r\n$4\r\nPING\r\n"
            );
        });
    }
}
