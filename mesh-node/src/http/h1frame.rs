//! Where an HTTP/1.1 message's body ends (RFC 9112 section 6), from its head as `httparse` gives
//! it, for the lean paths between node proxies: the destination forwards bytes and must find
//! each message's end without decoding the body; the source decodes chunked answers. Ambiguous framing is refused, not guessed: a proxy that reads a
//! message's length differently from the next hop is how requests get smuggled.
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
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
    #[error("a request with more than one Content-Length value")]
    SeveralLengths,
    #[error("Transfer-Encoding coding {0:?} is not a token")]
    BadCoding(String),
    #[error("more than {0} trailer fields")]
    TooManyTrailers(usize),
    #[error("status {0} is not in 100..=599")]
    BadStatus(u16),
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    CodingInHttp10,
    #[error("Transfer-Encoding {0:?} does not end in chunked")]
    NotChunked(String),
    #[error("chunk size line {0:?}")]
    BadChunkSize(String),
    #[error("chunk data not followed by CRLF")]
    BadChunkEnd,
    #[error("chunk size line or trailers longer than {0} bytes")]
    LineTooLong(usize),
    #[error("trailers {0:?}")]
    BadTrailers(String),
    #[error("a chunk size or trailer line ends in a bare line feed, not CRLF")]
    BareLineFeed,
}

/// Longest chunk-size line or trailer line accepted.
pub const MAX_LINE: usize = 4096;

/// A transfer coding (RFC 9112 section 7): a token, then `;` parameters. Empty list elements
/// (`chunked,`), which RFC 9110 asks recipients to skip, are refused: hyper reads
/// `chunked,` as not chunked (found by fuzzing), so peers would end the body apart.
fn coding(c: &str) -> bool {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let (name, params) = c.split_once(';').unwrap_or((c, ""));
    let name = name.trim_end_matches([' ', '\t']);
    (!name.is_empty() && name.bytes().all(tchar))
        && params
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// An HTTP/1.0 message with Transfer-Encoding has faulty framing (RFC 9112 section 6.1): HTTP/1.0
/// has no codings, so peers read its body differently (hyper refuses it).
fn http10_coding(version: Option<u8>, headers: &[httparse::Header]) -> Result<(), FrameError> {
    let coded = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if version == Some(0) && coded {
        return Err(FrameError::CodingInHttp10);
    }
    Ok(())
}

/// The framing headers of a head: the last coding of Transfer-Encoding, and Content-Length.
fn framing(headers: &[httparse::Header]) -> Result<(Option<String>, Option<u64>), FrameError> {
    let (mut te, mut cl) = (None::<String>, None::<u64>);
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value);
            // Each coding must be one servers read alike: a token, then parameters. A coding
            // some read past and others refuse (`\xd9 gzip, chunked`, found by fuzzing) would
            // frame the message one way here and another way there.
            if let Some(bad) = v.split(',').map(str::trim).find(|c| !coding(c)) {
                return Err(FrameError::BadCoding(bad.to_string()));
            }
            // Several fields or a list: the last coding is the one that frames the message.
            te = v.rsplit(',').next().map(|c| c.trim().to_ascii_lowercase());
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
///
/// Unlike a response's, a request's length must be one value: RFC 9110 lets a recipient take
/// `5, 5` or two equal fields as one, but servers differ (hyper refuses them, others take the
/// first or the last), and the relay forwards the fields as they came.
pub fn request_body(
    version: Option<u8>,
    headers: &[httparse::Header],
) -> Result<BodyKind, FrameError> {
    http10_coding(version, headers)?;
    let values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value.split(|b| *b == b',').count())
        .sum::<usize>();
    if values > 1 {
        return Err(FrameError::SeveralLengths);
    }
    match framing(headers)? {
        (Some(te), _) if te == "chunked" => Ok(BodyKind::Chunked),
        (Some(te), _) => Err(FrameError::NotChunked(te)),
        (None, Some(n)) => Ok(BodyKind::Length(n)),
        (None, None) => Ok(BodyKind::None),
    }
}

/// A response's body, given its status and whether the request was `HEAD`.
pub fn response_body(
    version: Option<u8>,
    status: u16,
    head_request: bool,
    headers: &[httparse::Header],
) -> Result<BodyKind, FrameError> {
    // httparse takes any three digits; a `002` would pass as an interim answer (below 200)
    // where a client refuses it (found by fuzzing).
    if !(100..=599).contains(&status) {
        return Err(FrameError::BadStatus(status));
    }
    http10_coding(version, headers)?;
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

/// Finds the end of a chunked body as its bytes arrive, without copying them ([`Chunked::scan`]),
/// or decodes it into its data and trailers ([`Chunked::decode`]).
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: State,
    /// The current size or trailer line, when it spans reads (at most [`MAX_LINE`]).
    line: Vec<u8>,
    /// Trailer lines, when decoding: `Some` keeps them.
    trailers: Option<Vec<u8>>,
    /// Trailer bytes and fields seen, kept or not: they are limited either way.
    trailer_bytes: usize,
    trailer_fields: usize,
}

/// The next piece of a chunked body being decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Chunk data, split off the front of the input without copying.
    Data(Bytes),
    /// The input holds nothing more of the body: more is needed.
    More,
    /// The body ended, with these trailers (empty when it had none).
    End(HeaderMap),
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
    /// A decoder: like the scanner, and it keeps the trailers.
    pub fn decoder() -> Self {
        Self {
            trailers: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Scans `buf`, the body's next bytes: how many of them belong to the body, and whether the
    /// body ended there. Bytes after the end are the next message's.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(usize, bool), FrameError> {
        let n = self.advance(buf, false)?;
        Ok((n, self.state == State::Done))
    }

    /// Decodes from the front of `buf`, taking what it uses: the next chunk data, `More` once
    /// `buf` is used up, or the end. Bytes after the end are left in `buf`.
    pub fn decode(&mut self, buf: &mut Bytes) -> Result<Decoded, FrameError> {
        loop {
            match self.state {
                State::Done => {
                    let lines = self.trailers.take().unwrap_or_default();
                    return Ok(Decoded::End(parse_trailers(&lines)?));
                }
                State::Data(n) if !buf.is_empty() => {
                    let take = n.min(buf.len() as u64);
                    self.state = if n == take {
                        State::DataCr
                    } else {
                        State::Data(n - take)
                    };
                    return Ok(Decoded::Data(buf.split_to(take as usize)));
                }
                _ if buf.is_empty() => return Ok(Decoded::More),
                _ => {
                    let n = self.advance(buf, true)?;
                    buf.advance(n);
                }
            }
        }
    }

    /// Runs the framing over `buf`; how many bytes it used. With `stop_at_data` it stops where
    /// chunk data starts (`decode` splits the data off itself).
    fn advance(&mut self, buf: &[u8], stop_at_data: bool) -> Result<usize, FrameError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Done => break,
                State::Data(_) if stop_at_data => break,
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
                    // Strict CRLF: a peer that reads a bare LF as a line end would frame this
                    // body differently from one that does not (request smuggling).
                    if !line.ends_with(b"\r\n") {
                        return Err(FrameError::BareLineFeed);
                    }
                    // A size has at least one digit: httparse reads an empty line as 0, hyper
                    // refuses it, others may skip it (found by fuzzing).
                    // Extensions are visible ASCII: hyper refuses other bytes in them.
                    let visible = |b: &u8| *b == b'\t' || (b' '..=b'~').contains(b);
                    if self.state == State::Size
                        && (!line[0].is_ascii_hexdigit()
                            || !line[..line.len() - 2].iter().all(visible))
                    {
                        return Err(FrameError::BadChunkSize(
                            String::from_utf8_lossy(&line).into_owned(),
                        ));
                    }
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
                        _ if line == b"\r\n" => State::Done,
                        other => {
                            // Each trailer line is one well-formed field, and they are limited,
                            // whether they are kept (decoding) or passed on (scanning).
                            self.trailer_bytes += line.len();
                            self.trailer_fields += 1;
                            // The decoder parses at most this many: the scanner must not pass
                            // on a body the other end refuses (found by fuzzing).
                            if self.trailer_fields > MAX_TRAILER_FIELDS {
                                return Err(FrameError::TooManyTrailers(MAX_TRAILER_FIELDS));
                            }
                            if self.trailer_bytes > MAX_TRAILERS {
                                return Err(FrameError::LineTooLong(MAX_TRAILERS));
                            }
                            check_trailer_line(&line)?;
                            if let Some(t) = &mut self.trailers {
                                t.extend_from_slice(&line);
                            }
                            other
                        }
                    };
                }
            }
        }
        Ok(i)
    }
}

/// Most trailer fields a body may carry.
const MAX_TRAILER_FIELDS: usize = 64;

/// Most trailer bytes a body may carry.
const MAX_TRAILERS: usize = 4 * MAX_LINE;

/// One trailer line (with its CRLF) must be exactly one field as a head would hold it.
fn check_trailer_line(line: &[u8]) -> Result<(), FrameError> {
    let block = [line, b"\r\n"].concat();
    let mut fields = [httparse::EMPTY_HEADER; 1];
    match httparse::parse_headers(&block, &mut fields) {
        Ok(httparse::Status::Complete((n, [_]))) if n == block.len() => Ok(()),
        _ => Err(FrameError::BadTrailers(
            String::from_utf8_lossy(line).into_owned(),
        )),
    }
}

/// Trailer lines (each ending in a line feed) as fields.
fn parse_trailers(lines: &[u8]) -> Result<HeaderMap, FrameError> {
    let mut map = HeaderMap::new();
    if lines.is_empty() {
        return Ok(map);
    }
    // `parse_headers` wants the empty line that ends them.
    let block = [lines, b"\r\n"].concat();
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    let bad = || FrameError::BadTrailers(String::from_utf8_lossy(lines).into_owned());
    match httparse::parse_headers(&block, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| bad())?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| bad())?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(bad()),
    }
}

/// A response head at the front of `buf`: its length and fields, or `Partial`. The field slots
/// stay uninitialized: filling a few hundred before every parse is kilobytes of writes.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<httparse::Status<(usize, httparse::Response<'h, 'b>)>, httparse::Error> {
    let mut r = httparse::Response::new(&mut []);
    Ok(
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, fields)?
        {
            httparse::Status::Complete(n) => httparse::Status::Complete((n, r)),
            httparse::Status::Partial => httparse::Status::Partial,
        },
    )
}

/// Largest request head accepted from an app (HTTP/1.1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in a request from an app: hyper's own HTTP/1.1 limit, which is why it is not
/// set on the server (set, hyper fills a vector of that many slots before every parse; the
/// end-to-end header limits test holds both to this number).
pub const MAX_HEADERS: usize = 100;
/// Longest head and most header fields accepted: the source enforced the app's limits, these
/// only bound memory.
pub(crate) const MAX_HEAD: usize = MAX_HEADER_BYTES * 2;
pub(crate) const MAX_FIELDS: usize = MAX_HEADERS * 2;

/// Whether a `Connection` field says `close`.
pub(crate) fn says_close(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// An HTTP/1.1 request head, origin-form, with `headers` as they are.
pub(crate) fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = uri.path_and_query().map_or("", |p| p.as_str());
    // Origin-form: an absolute-form target without a path (`http://host?q`) has none either,
    // and `?q` alone is no request target (found by the `request_framing` fuzz target).
    if !target.starts_with('/') && target != "*" {
        out.extend_from_slice(b"/");
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(out, headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn write_fields<'a>(
    out: &mut BytesMut,
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
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
                &[("transfer-encoding", "\u{d9} gzip, chunked")],
                Err(FrameError::BadCoding("\u{d9} gzip".into())),
            ),
            (
                &[("transfer-encoding", "\"chunked\"")],
                Err(FrameError::BadCoding("\"chunked\"".into())),
            ),
            (&[("transfer-encoding", "gzip;q=1 , chunked")], Ok(Chunked)),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                Err(FrameError::BothLengths),
            ),
            (
                &[("content-length", "5"), ("content-length", "6")],
                Err(FrameError::SeveralLengths),
            ),
            (
                &[("content-length", "5, 5")],
                Err(FrameError::SeveralLengths),
            ),
            (
                &[("content-length", "5"), ("content-length", "5")],
                Err(FrameError::SeveralLengths),
            ),
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
            assert_eq!(&request_body(Some(1), &h(headers)), want, "{headers:?}");
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
                response_body(Some(1), status, head, &h(headers)),
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
    fn codings_that_peers_read_differently_are_refused() {
        let te = |v: &'static str| {
            [httparse::Header {
                name: "transfer-encoding",
                value: v.as_bytes(),
            }]
        };
        let bad = |c: &str| Err(FrameError::BadCoding(c.into()));
        assert_eq!(request_body(Some(1), &te("")), bad(""));
        assert_eq!(request_body(Some(1), &te(" , ")), bad(""));
        assert_eq!(request_body(Some(1), &te("chunked,")), bad(""));
        assert_eq!(request_body(Some(1), &te("gzip,,chunked")), bad(""));
        assert_eq!(
            request_body(Some(0), &te("chunked")),
            Err(FrameError::CodingInHttp10)
        );
        assert_eq!(
            response_body(Some(0), 200, false, &te("gzip")),
            Err(FrameError::CodingInHttp10)
        );
        assert_eq!(
            response_body(Some(1), 200, false, &te("gzip")),
            Ok(BodyKind::UntilClose)
        );
        assert_eq!(
            response_body(Some(1), 2, false, &[]),
            Err(FrameError::BadStatus(2))
        );
    }

    #[test]
    fn chunked_errors() {
        let cases: &[&[u8]] = &[
            b"zz\r\n",
            b"3\r\nabcX",
            b"3\r\nabc\rX",
            // Bare line feeds, in a size line, after the last chunk, in and after trailers.
            b"3\nabc\r\n",
            b"0\n\r\n",
            b"0\r\n\n",
            b"0\r\nx: 1\n\r\n",
            // Trailer lines that are not one field.
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
            b"0\r\nbad name: x\r\n\r\n",
            // A size line without a digit (httparse reads it as 0).
            b"\r\n\r\n",
            b";ext\r\n\r\n",
            b" 0\r\n\r\n",
            // An extension with bytes that are not visible ASCII.
            b"0;x=\xff\r\n\r\n",
        ];
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
        // The scanner passes no more trailer fields than the decoder takes.
        let trailers = |n: usize| [&b"0\r\n"[..], &b"a: 1\r\n".repeat(n), b"\r\n"].concat();
        assert!(
            Chunked::default()
                .scan(&trailers(MAX_TRAILER_FIELDS))
                .is_ok()
        );
        assert_eq!(
            Chunked::default().scan(&trailers(MAX_TRAILER_FIELDS + 1)),
            Err(FrameError::TooManyTrailers(MAX_TRAILER_FIELDS))
        );
    }

    /// Decodes `input` fed in the given pieces: the data, the trailers, and what followed the end.
    fn decode_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, HeaderMap, Vec<u8>), FrameError> {
        let mut d = Chunked::decoder();
        let mut data = Vec::new();
        for (k, piece) in pieces.iter().enumerate() {
            let mut buf = Bytes::copy_from_slice(piece);
            loop {
                match d.decode(&mut buf)? {
                    Decoded::Data(b) => data.extend_from_slice(&b),
                    Decoded::More => break,
                    Decoded::End(t) => {
                        let mut rest = buf.to_vec();
                        pieces[k + 1..]
                            .iter()
                            .for_each(|p| rest.extend_from_slice(p));
                        return Ok((data, t, rest));
                    }
                }
            }
        }
        Err(FrameError::BadChunkEnd)
    }

    #[test]
    fn chunked_is_decoded_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n";
        let all = [&body[..], b"NEXT"].concat();
        for cut in 0..all.len() {
            for cut2 in cut..all.len() {
                let pieces = [&all[..cut], &all[cut..cut2], &all[cut2..]];
                let (data, t, rest) = decode_all(&pieces).unwrap();
                assert_eq!(data, b"hello world", "cuts {cut} {cut2}");
                assert_eq!(t.get("grpc-status").unwrap(), "0");
                assert_eq!(t.get("x-b").unwrap(), "2");
                assert_eq!(rest, b"NEXT", "cuts {cut} {cut2}");
            }
        }
        // No trailers; and the scanner's errors are the decoder's.
        let (data, t, rest) = decode_all(&[b"0\r\n\r\n"]).unwrap();
        assert!(data.is_empty() && t.is_empty() && rest.is_empty());
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX", b"0\r\nno colon\r\n\r\n"] {
            assert!(decode_all(&[bad]).is_err(), "{bad:?}");
        }
    }
}
