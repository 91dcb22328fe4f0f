//! Where an HTTP/1.1 message's body ends (RFC 9112 section 6), from its head as `httparse` gives
//! it, for the destination's lean path: it forwards bytes and must find each message's end
//! without decoding the body. Ambiguous framing is refused, not guessed: a proxy that reads a
//! message's length differently from the next hop is how requests get smuggled.
use thiserror::Error;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only): the connection cannot be reused.
    UntilClose,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("both Transfer-Encoding and Content-Length")]
    BothLengths,
    #[error("Content-Length {0:?} is not a length")]
    BadLength(String),
    #[error("Content-Length values disagree")]
    LengthsDisagree,
    #[error("Transfer-Encoding {0:?} does not end in chunked")]
    NotChunked(String),
    #[error("chunk size line {0:?}")]
    BadChunkSize(String),
    #[error("chunk data not followed by CRLF")]
    BadChunkEnd,
    #[error("chunk size line or trailers longer than {0} bytes")]
    LineTooLong(usize),
}

/// Longest chunk-size line or trailer line accepted.
pub const MAX_LINE: usize = 4096;

/// The framing headers of a head: the last coding of Transfer-Encoding, and Content-Length.
fn framing(headers: &[httparse::Header]) -> Result<(Option<String>, Option<u64>), FrameError> {
    let (mut te, mut cl) = (None::<String>, None::<u64>);
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value);
            // Several fields or a list: the last coding is the one that frames the message.
            if let Some(last) = v.rsplit(',').map(str::trim).find(|c| !c.is_empty()) {
                te = Some(last.to_ascii_lowercase());
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = String::from_utf8_lossy(h.value);
            for part in v.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(FrameError::BadLength(v.into_owned()));
                }
                let n = part
                    .parse::<u64>()
                    .map_err(|_| FrameError::BadLength(v.to_string()))?;
                if cl.is_some_and(|c| c != n) {
                    return Err(FrameError::LengthsDisagree);
                }
                cl = Some(n);
            }
        }
    }
    if te.is_some() && cl.is_some() {
        return Err(FrameError::BothLengths);
    }
    Ok((te, cl))
}

/// A request's body: chunked, a length, or none. A request cannot be delimited by closing.
pub fn request_body(headers: &[httparse::Header]) -> Result<BodyKind, FrameError> {
    match framing(headers)? {
        (Some(te), _) if te == "chunked" => Ok(BodyKind::Chunked),
        (Some(te), _) => Err(FrameError::NotChunked(te)),
        (None, Some(n)) => Ok(BodyKind::Length(n)),
        (None, None) => Ok(BodyKind::None),
    }
}

/// A response's body, given its status and whether the request was `HEAD`.
pub fn response_body(
    status: u16,
    head_request: bool,
    headers: &[httparse::Header],
) -> Result<BodyKind, FrameError> {
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyKind::None);
    }
    match framing(headers)? {
        (Some(te), _) if te == "chunked" => Ok(BodyKind::Chunked),
        (Some(_), _) => Ok(BodyKind::UntilClose),
        (None, Some(n)) => Ok(BodyKind::Length(n)),
        (None, None) => Ok(BodyKind::UntilClose),
    }
}

/// Finds the end of a chunked body as its bytes arrive, without copying them.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: State,
    /// The current size or trailer line, when it spans reads (at most [`MAX_LINE`]).
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line (hex size, optional extensions, CRLF).
    #[default]
    Size,
    /// `n` bytes of chunk data left, then CRLF.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

impl Chunked {
    /// Scans `buf`, the body's next bytes: how many of them belong to the body, and whether the
    /// body ended there. Bytes after the end are the next message's.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(usize, bool), FrameError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Done => break,
                State::Data(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    self.state = if n == take {
                        State::DataCr
                    } else {
                        State::Data(n - take)
                    };
                }
                State::DataCr => {
                    if buf[i] != b'\r' {
                        return Err(FrameError::BadChunkEnd);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if buf[i] != b'\n' {
                        return Err(FrameError::BadChunkEnd);
                    }
                    self.state = State::Size;
                    i += 1;
                }
                State::Size | State::Trailer => {
                    let rest = &buf[i..];
                    let lf = rest.iter().position(|&b| b == b'\n');
                    let piece = &rest[..lf.map_or(rest.len(), |p| p + 1)];
                    if self.line.len() + piece.len() > MAX_LINE {
                        return Err(FrameError::LineTooLong(MAX_LINE));
                    }
                    self.line.extend_from_slice(piece);
                    i += piece.len();
                    if lf.is_none() {
                        break;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.state = match self.state {
                        State::Size => match httparse::parse_chunk_size(&line) {
                            Ok(httparse::Status::Complete((_, 0))) => State::Trailer,
                            Ok(httparse::Status::Complete((_, n))) => State::Data(n),
                            _ => {
                                return Err(FrameError::BadChunkSize(
                                    String::from_utf8_lossy(&line).into_owned(),
                                ));
                            }
                        },
                        // An empty line ends the trailers.
                        _ if line == b"\r\n" || line == b"\n" => State::Done,
                        other => other,
                    };
                }
            }
        }
        Ok((i, self.state == State::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head's fields, as (name, value) pairs.
    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<httparse::Header<'a>> {
        pairs
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn request_framing() {
        use BodyKind::*;
        let cases: &[(Fields, Result<BodyKind, FrameError>)] = &[
            (&[], Ok(None)),
            (&[("content-length", "12")], Ok(Length(12))),
            (&[("Content-Length", "0")], Ok(Length(0))),
            (&[("transfer-encoding", "chunked")], Ok(Chunked)),
            (&[("Transfer-Encoding", "gzip, chunked")], Ok(Chunked)),
            (
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                Ok(Chunked),
            ),
            (
                &[("transfer-encoding", "chunked, gzip")],
                Err(FrameError::NotChunked("gzip".into())),
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                Err(FrameError::BothLengths),
            ),
            (
                &[("content-length", "5"), ("content-length", "6")],
                Err(FrameError::LengthsDisagree),
            ),
            (&[("content-length", "5, 5")], Ok(Length(5))),
            (
                &[("content-length", "+5")],
                Err(FrameError::BadLength("+5".into())),
            ),
            (
                &[("content-length", "0x10")],
                Err(FrameError::BadLength("0x10".into())),
            ),
            (
                &[("content-length", "")],
                Err(FrameError::BadLength("".into())),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(&request_body(&h(headers)), want, "{headers:?}");
        }
    }

    #[test]
    fn response_framing() {
        use BodyKind::*;
        let cl = &[("content-length", "3")][..];
        let cases: &[(u16, bool, Fields, BodyKind)] = &[
            (200, false, cl, Length(3)),
            (200, true, cl, None),
            (204, false, &[], None),
            (304, false, cl, None),
            (101, false, &[], None),
            (200, false, &[], UntilClose),
            (200, false, &[("transfer-encoding", "chunked")], Chunked),
            (200, false, &[("transfer-encoding", "gzip")], UntilClose),
        ];
        for &(status, head, headers, want) in cases {
            assert_eq!(
                response_body(status, head, &h(headers)),
                Ok(want),
                "{status} {head} {headers:?}"
            );
        }
    }

    #[test]
    fn chunked_end_is_found_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n";
        let all = [&body[..], &next[..]].concat();
        // One scan.
        let mut c = Chunked::default();
        assert_eq!(c.scan(&all), Ok((body.len(), true)));
        // Split at every point, lines included.
        for cut in 1..body.len() {
            let mut c = Chunked::default();
            let (a, done) = c.scan(&all[..cut]).unwrap();
            assert_eq!((a, done), (cut, false), "cut {cut}");
            assert_eq!(
                c.scan(&all[cut..]),
                Ok((body.len() - cut, true)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn chunked_errors() {
        let cases: &[&[u8]] = &[b"zz\r\n", b"3\r\nabcX", b"3\r\nabc\rX"];
        for bad in cases {
            assert!(Chunked::default().scan(bad).is_err(), "{bad:?}");
        }
        let long = vec![b'a'; MAX_LINE + 1];
        assert_eq!(
            Chunked::default().scan(&long),
            Err(FrameError::LineTooLong(MAX_LINE))
        );
        // An empty body: just the last chunk.
        assert_eq!(Chunked::default().scan(b"0\r\n\r\n"), Ok((5, true)));
    }
}
