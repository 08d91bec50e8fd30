//! What the NATS broker puts on the wire: room names as subject tokens, and the binary
//! envelope of publications and join/leave events.
//!
//! Room token: bytes of `A-Z a-z 0-9 - / =` stand for themselves, every other byte `b`
//! (`.` `_` `:` `@` `,`) becomes `_` followed by two upper-case hex digits. The token never
//! holds a `.` (the subject separator), `*` or `>`, so it is always exactly one valid subject
//! token (and a valid JetStream key-value key); `_` only starts an escape, so the mapping is
//! one-to-one and reversible ([`room_from_token`]).
//!
//! Envelope (all integers big-endian):
//!
//! ```text
//! publication: "rc" 1 'P' flags [offset u64, epoch u8-len] [client u32-len, user u32-len]
//!              [skip-client u32-len] data(JSON, the rest)
//!              flags: 1 = has position, 2 = has publisher info, 4 = has skip-client
//! join/leave:  "rc" 1 ('J'|'L') flags client u32-len user u32-len [info u32-len]
//!              [room_info u32-len]      flags: 1 = has info, 2 = has room_info
//! idempotency claim: "rc" 1 'I' flags [offset u64, epoch u8-len]
//!              flags: 1 = published (else: publish in progress), 2 = has position
//! ```
//!
//! The same room token escaping turns an idempotency key (any UTF-8) into one subject
//! token.
//!
//! Decoding never panics: anything malformed is an error and the message is dropped.

use bytes::{BufMut, Bytes, BytesMut};
use roomcast_protocol::{Data, DataError, Member, PublisherInfo, Room};

use crate::{BrokerPublication, RoomEvent};

const MAGIC: &[u8; 2] = b"rc";
const VERSION: u8 = 1;
const KIND_PUBLICATION: u8 = b'P';
const KIND_JOIN: u8 = b'J';
const KIND_LEAVE: u8 = b'L';
const KIND_CLAIM: u8 = b'I';

const PUB_POSITION: u8 = 1;
const PUB_INFO: u8 = 2;
const PUB_SKIP: u8 = 4;
const EV_INFO: u8 = 1;
const EV_ROOM_INFO: u8 = 2;
const CLAIM_DONE: u8 = 1;
const CLAIM_POSITION: u8 = 2;

/// Longest epoch the envelope carries (ours are 12 characters).
pub const MAX_EPOCH_LEN: usize = 64;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The subject token of a room (see the module doc).
pub fn room_token(room: &str) -> String {
    let mut out = String::with_capacity(room.len() + 8);
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'=') {
            out.push(b as char);
        } else {
            out.push('_');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    out
}

/// The room a token stands for; `None` when it is not the token of a legal room.
pub fn room_from_token(token: &str) -> Option<Room> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'_' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let name = String::from_utf8(out).ok()?;
    let room = Room::parse(&name).ok()?;
    // Only the canonical token: `room_token(room)` must give `token` back.
    (room_token(&room) == token).then_some(room)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a roomcast envelope")]
    NotEnvelope,
    #[error("roomcast envelope version {0} is newer than this node understands")]
    Version(u8),
    #[error("truncated envelope")]
    Truncated,
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    #[error("a string in the envelope is not UTF-8")]
    NotUtf8,
    #[error("bad epoch in envelope")]
    BadEpoch,
    #[error("bad data in envelope: {0}")]
    Data(#[from] DataError),
}

/// A decoded live message.
#[derive(Debug, Clone, PartialEq)]
pub enum Live {
    Publication(BrokerPublication),
    Event(RoomEvent),
}

fn put_str32(out: &mut BytesMut, s: &[u8]) {
    out.put_u32(s.len() as u32);
    out.put_slice(s);
}

/// Encodes a publication, with `position` when its room keeps history.
pub fn encode_publication(p: &BrokerPublication, position: Option<(u64, &str)>) -> Result<Bytes, DataError> {
    let data = p.data.json()?;
    let mut flags = 0;
    let mut out = BytesMut::with_capacity(data.len() + 64);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(KIND_PUBLICATION);
    if position.is_some() {
        flags |= PUB_POSITION;
    }
    if p.info.is_some() {
        flags |= PUB_INFO;
    }
    if p.skip_client.is_some() {
        flags |= PUB_SKIP;
    }
    out.put_u8(flags);
    if let Some((offset, epoch)) = position {
        out.put_u64(offset);
        let epoch = epoch.as_bytes();
        out.put_u8(epoch.len().min(MAX_EPOCH_LEN) as u8);
        out.put_slice(&epoch[..epoch.len().min(MAX_EPOCH_LEN)]);
    }
    if let Some(info) = &p.info {
        put_str32(&mut out, info.client.as_bytes());
        put_str32(&mut out, info.user.as_bytes());
    }
    if let Some(skip) = &p.skip_client {
        put_str32(&mut out, skip.as_bytes());
    }
    out.put_slice(data);
    Ok(out.freeze())
}

/// Encodes a join or leave.
pub fn encode_event(event: &RoomEvent) -> Result<Bytes, DataError> {
    let (kind, m) = match event {
        RoomEvent::Join(m) => (KIND_JOIN, m),
        RoomEvent::Leave(m) => (KIND_LEAVE, m),
    };
    let info = m.info.as_ref().map(Data::json).transpose()?;
    let room_info = m.room_info.as_ref().map(Data::json).transpose()?;
    let mut out = BytesMut::with_capacity(64);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u8(if info.is_some() { EV_INFO } else { 0 } | if room_info.is_some() { EV_ROOM_INFO } else { 0 });
    put_str32(&mut out, m.client.as_bytes());
    put_str32(&mut out, m.user.as_bytes());
    if let Some(i) = info {
        put_str32(&mut out, i);
    }
    if let Some(i) = room_info {
        put_str32(&mut out, i);
    }
    Ok(out.freeze())
}

/// A bounds-checked reader over an envelope.
struct Reader<'a> {
    src: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a Bytes) -> Self {
        Reader { src, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.src.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str32(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
    /// `n` bytes as a shared slice of the source (no copy).
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.at;
        self.take(n)?;
        Ok(self.src.slice(start..start + n))
    }
    fn rest(&mut self) -> Bytes {
        let start = self.at.min(self.src.len());
        self.at = self.src.len();
        self.src.slice(start..)
    }
    /// Checks magic and version; returns the kind and flags.
    fn header(&mut self) -> Result<(u8, u8), DecodeError> {
        if self.take(2).map_err(|_| DecodeError::NotEnvelope)? != MAGIC {
            return Err(DecodeError::NotEnvelope);
        }
        match self.u8().map_err(|_| DecodeError::NotEnvelope)? {
            VERSION => {}
            v if v > VERSION => return Err(DecodeError::Version(v)),
            _ => return Err(DecodeError::NotEnvelope),
        }
        Ok((self.u8()?, self.u8()?))
    }
    fn position(&mut self) -> Result<(u64, String), DecodeError> {
        let offset = self.u64()?;
        let n = self.u8()? as usize;
        let epoch = self.take(n)?;
        if offset == 0 || epoch.is_empty() || !epoch.iter().all(u8::is_ascii_graphic) {
            return Err(DecodeError::BadEpoch);
        }
        Ok((offset, String::from_utf8(epoch.to_vec()).map_err(|_| DecodeError::NotUtf8)?))
    }
}

/// The position a stored publication carries, without decoding its data (cheap).
pub fn decode_position(payload: &Bytes) -> Result<(u64, String), DecodeError> {
    let mut r = Reader::new(payload);
    let (kind, flags) = r.header()?;
    if kind != KIND_PUBLICATION {
        return Err(DecodeError::UnknownKind(kind));
    }
    if flags & PUB_POSITION == 0 {
        return Err(DecodeError::BadEpoch);
    }
    r.position()
}

/// Decodes a publication of `room`.
pub fn decode_publication(room: &Room, payload: &Bytes) -> Result<BrokerPublication, DecodeError> {
    match decode_live(room, payload)? {
        Live::Publication(p) => Ok(p),
        Live::Event(_) => Err(DecodeError::UnknownKind(KIND_JOIN)),
    }
}

/// Decodes a message received on `room`'s live subject.
pub fn decode_live(room: &Room, payload: &Bytes) -> Result<Live, DecodeError> {
    let mut r = Reader::new(payload);
    let (kind, flags) = r.header()?;
    match kind {
        KIND_PUBLICATION => {
            let (offset, epoch) = if flags & PUB_POSITION != 0 {
                let (o, e) = r.position()?;
                (Some(o), Some(e))
            } else {
                (None, None)
            };
            let info = if flags & PUB_INFO != 0 {
                Some(PublisherInfo { client: r.str32()?, user: r.str32()? })
            } else {
                None
            };
            let skip_client = if flags & PUB_SKIP != 0 { Some(r.str32()?) } else { None };
            let data = Data::from_json(r.rest())?;
            Ok(Live::Publication(BrokerPublication {
                room: room.clone(),
                offset,
                epoch,
                data,
                info,
                skip_client,
            }))
        }
        KIND_JOIN | KIND_LEAVE => {
            let client = r.str32()?;
            let user = r.str32()?;
            let data = |r: &mut Reader<'_>| -> Result<Data, DecodeError> {
                let n = r.u32()? as usize;
                Ok(Data::from_json(r.bytes(n)?)?)
            };
            let info = if flags & EV_INFO != 0 { Some(data(&mut r)?) } else { None };
            let room_info = if flags & EV_ROOM_INFO != 0 { Some(data(&mut r)?) } else { None };
            let m = Member { client, user, info, room_info };
            Ok(Live::Event(if kind == KIND_JOIN { RoomEvent::Join(m) } else { RoomEvent::Leave(m) }))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// The state of an idempotency claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Claimed; the publication is in progress.
    Pending,
    /// Published; with the position when its room keeps history.
    Done(Option<(u64, String)>),
}

/// Encodes an idempotency claim.
pub fn encode_claim(claim: &Claim) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + MAX_EPOCH_LEN);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(KIND_CLAIM);
    match claim {
        Claim::Pending => out.put_u8(0),
        Claim::Done(None) => out.put_u8(CLAIM_DONE),
        Claim::Done(Some((offset, epoch))) => {
            out.put_u8(CLAIM_DONE | CLAIM_POSITION);
            out.put_u64(*offset);
            let epoch = &epoch.as_bytes()[..epoch.len().min(MAX_EPOCH_LEN)];
            out.put_u8(epoch.len() as u8);
            out.put_slice(epoch);
        }
    }
    out.freeze()
}

/// Decodes an idempotency claim.
pub fn decode_claim(payload: &Bytes) -> Result<Claim, DecodeError> {
    let mut r = Reader::new(payload);
    let (kind, flags) = r.header()?;
    if kind != KIND_CLAIM {
        return Err(DecodeError::UnknownKind(kind));
    }
    let claim = match (flags & CLAIM_DONE != 0, flags & CLAIM_POSITION != 0) {
        (false, _) => Claim::Pending,
        (true, false) => Claim::Done(None),
        (true, true) => Claim::Done(Some(r.position()?)),
    };
    if r.at != payload.len() {
        return Err(DecodeError::Truncated);
    }
    Ok(claim)
}

/// Checks an epoch marker's body: the epoch, as written by [`crate::nats`].
pub fn decode_epoch(payload: &[u8]) -> Option<String> {
    let ok = !payload.is_empty()
        && payload.len() <= MAX_EPOCH_LEN
        && payload.iter().all(|b| b.is_ascii_alphanumeric());
    if ok { String::from_utf8(payload.to_vec()).ok() } else { None }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LEGAL: &str = "ABCXYZabcxyz0189._-:@=,/";

    #[test]
    fn tokens_are_single_valid_subject_tokens_and_reversible() {
        let long = LEGAL.repeat(200 / LEGAL.len() + 1)[..200].replace(':', "a");
        for name in ["a", "a.b", "ns:x.y/z@h=1,2", "_", "a_2E", "a.2E", "x_", "chat:a:b", &long, "a=b,c@d/e"]
        {
            let room = Room::parse(name).unwrap();
            let t = room_token(&room);
            assert!(!t.is_empty());
            assert!(!t.contains(['.', '*', '>', ' ', '\t', '\r', '\n']), "{t}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=_".contains(&b)), "{t}");
            assert_eq!(room_from_token(&t), Some(room), "{name}");
        }
        // Distinct rooms, distinct tokens (the escape character itself is escaped).
        assert_ne!(room_token("a_2E"), room_token("a."));
        assert_eq!(room_token("a."), "a_2E");
        assert_eq!(room_token("a_"), "a_5F");
        // Non-canonical or broken tokens are refused.
        for t in ["a_2e", "a_", "a_4", "a_ZZ", "_20", "a_2F", ""] {
            assert_eq!(room_from_token(t), None, "{t}");
        }
    }

    #[test]
    fn claims_round_trip_and_garbage_is_refused() {
        for c in [Claim::Pending, Claim::Done(None), Claim::Done(Some((7, "abcDEF123456".into())))] {
            assert_eq!(decode_claim(&encode_claim(&c)).unwrap(), c);
        }
        let good = encode_claim(&Claim::Done(Some((7, "e".into()))));
        for n in 0..good.len() {
            assert!(decode_claim(&good.slice(..n)).is_err(), "{n}");
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(decode_claim(&Bytes::from(long)).is_err());
        assert!(decode_claim(&encode_publication(&pubn(Some(1)), Some((1, "e"))).unwrap()).is_err());
        // Keys become one subject token, whatever they hold.
        let t = room_token("key with spaces.and*wild>cards/é");
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=_".contains(&b)), "{t}");
    }

    fn pubn(offset: Option<u64>) -> BrokerPublication {
        let mut p =
            BrokerPublication::new(Room::parse("r.1").unwrap(), Data::from_json("{\"a\":[1,2]}").unwrap());
        p.info = Some(PublisherInfo { client: "c1".into(), user: "ü".into() });
        p.skip_client = Some("c1".into());
        if let Some(o) = offset {
            p.offset = Some(o);
            p.epoch = Some("EPOCH1".into());
        }
        p
    }

    #[test]
    fn publications_round_trip() {
        let room = Room::parse("r.1").unwrap();
        for offset in [None, Some(7)] {
            let p = pubn(offset);
            let pos = offset.map(|o| (o, "EPOCH1"));
            let b = encode_publication(&p, pos).unwrap();
            assert_eq!(decode_live(&room, &b).unwrap(), Live::Publication(p.clone()));
            if let Some(o) = offset {
                assert_eq!(decode_position(&b).unwrap(), (o, "EPOCH1".to_string()));
            } else {
                assert!(decode_position(&b).is_err());
            }
        }
        let mut bare = BrokerPublication::new(room.clone(), Data::from_json("1").unwrap());
        let b = encode_publication(&bare, None).unwrap();
        bare.offset = None;
        assert_eq!(decode_publication(&room, &b).unwrap(), bare);
    }

    #[test]
    fn events_round_trip() {
        let room = Room::parse("r").unwrap();
        let m = Member {
            client: "c".into(),
            user: "u".into(),
            info: Some(Data::from_json("{\"n\":1}").unwrap()),
            room_info: None,
        };
        for ev in
            [RoomEvent::Join(m.clone()), RoomEvent::Leave(Member { room_info: m.info.clone(), ..m.clone() })]
        {
            let b = encode_event(&ev).unwrap();
            assert_eq!(decode_live(&room, &b).unwrap(), Live::Event(ev));
        }
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let room = Room::parse("r").unwrap();
        let good = encode_publication(&pubn(Some(3)), Some((3, "EPOCH1"))).unwrap();
        let ev = encode_event(&RoomEvent::Join(Member {
            client: "c".into(),
            user: "u".into(),
            info: Some(Data::from_json("{}").unwrap()),
            room_info: None,
        }))
        .unwrap();
        // Every truncation and every single-byte corruption of valid envelopes.
        for src in [&good, &ev] {
            for n in 0..src.len() {
                let _ = decode_live(&room, &src.slice(..n));
                let _ = decode_position(&src.slice(..n));
                for v in [0u8, 0xff, b'{', 0x80] {
                    let mut c = src.to_vec();
                    c[n] = v;
                    let _ = decode_live(&room, &Bytes::from(c));
                }
            }
        }
        for junk in
            [&b""[..], b"hello", b"rc", b"rc\x01", b"rc\x01Z\x00", b"rc\x01P\x01\xff\xff", b"{\"json\":1}"]
        {
            assert!(decode_live(&room, &Bytes::copy_from_slice(junk)).is_err());
        }
        assert_eq!(decode_position(&Bytes::from_static(b"rc\x02P\x01")), Err(DecodeError::Version(2)));
        assert_eq!(decode_position(&Bytes::from_static(b"rc\x00P\x01")), Err(DecodeError::NotEnvelope));
        // Huge declared lengths.
        let mut big = b"rc\x01J\x00".to_vec();
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_live(&room, &Bytes::from(big)), Err(DecodeError::Truncated));
    }

    #[test]
    fn epochs() {
        assert_eq!(decode_epoch(b"abcDEF123"), Some("abcDEF123".into()));
        assert_eq!(decode_epoch(b""), None);
        assert_eq!(decode_epoch(b"a b"), None);
        assert_eq!(decode_epoch(&[b'a'; 65]), None);
    }
}
