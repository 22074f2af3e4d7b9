//! The TCP plane's wire format: a hello per connection, then frames.
//!
//! Hello (28 bytes, little-endian): magic `MTDH`, version u16, reserved u16 (0), sender rank u32,
//! world size u32, session id u64, CRC32 of the preceding 24 bytes.
//!
//! Frame: a 48-byte header, the payload, then a 4-byte trailer. Header (little-endian): magic
//! `MTDP`, version u16, op u8, kind u8, direction u8, flags u8, reserved u16 (0), sender rank
//! u32, group id u32, micro-batch u32, chunk u32, step u64, payload length u64, CRC32 of the
//! preceding 44 header bytes. Flags: bit 0 set means the trailer is the CRC32 of the payload
//! (computed while streaming, on cache-hot chunks); clear means the trailer is 0 and the payload
//! is covered only by TCP's own checksum. Other flag bits must be 0.
//!
//! Invariant: a decoder never panics and never allocates more than the configured maximum on a
//! peer's say-so; every defect is reported as a sentence naming what was wrong.

use std::io::{self, Read, Write};

use crate::{Direction, Key, Kind, Op, Tag};

pub(crate) const HELLO_MAGIC: [u8; 4] = *b"MTDH";
pub(crate) const FRAME_MAGIC: [u8; 4] = *b"MTDP";
pub(crate) const VERSION: u16 = 1;
pub(crate) const HELLO_LEN: usize = 28;
pub(crate) const HEADER_LEN: usize = 48;
/// Header flag: the trailer holds the payload's CRC32.
const FLAG_PAYLOAD_CRC: u8 = 1;
/// Payload bytes moved per read or write call, so the checksum runs on cache-hot data.
const CHUNK: usize = 256 * 1024;

/// The first message on every connection: who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) sender: u32,
    pub(crate) world_size: u32,
    pub(crate) session: u64,
}

impl Hello {
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&HELLO_MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[8..12].copy_from_slice(&self.sender.to_le_bytes());
        out[12..16].copy_from_slice(&self.world_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.session.to_le_bytes());
        let crc = crc32fast::hash(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Self, String> {
        if bytes[0..4] != HELLO_MAGIC {
            return Err(format!(
                "bad hello magic {:02x?} (expected {:02x?})",
                &bytes[0..4],
                HELLO_MAGIC
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format!(
                "hello has protocol version {version}, this build speaks {VERSION}"
            ));
        }
        let crc = le_u32(&bytes[24..28]);
        let actual = crc32fast::hash(&bytes[..24]);
        if crc != actual {
            return Err(format!(
                "hello checksum mismatch (header says {crc:08x}, bytes hash to {actual:08x})"
            ));
        }
        Ok(Self {
            sender: le_u32(&bytes[8..12]),
            world_size: le_u32(&bytes[12..16]),
            session: le_u64(&bytes[16..24]),
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) sender: u32,
    pub(crate) key: Key,
    pub(crate) len: u64,
    /// Whether the trailer holds the payload's CRC32.
    pub(crate) payload_crc: bool,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = self.key.op as u8;
        out[7] = self.key.tag.kind as u8;
        out[8] = self.key.tag.direction as u8;
        out[9] = if self.payload_crc {
            FLAG_PAYLOAD_CRC
        } else {
            0
        };
        out[12..16].copy_from_slice(&self.sender.to_le_bytes());
        out[16..20].copy_from_slice(&self.key.group.to_le_bytes());
        out[20..24].copy_from_slice(&self.key.tag.micro_batch.to_le_bytes());
        out[24..28].copy_from_slice(&self.key.tag.chunk.to_le_bytes());
        out[28..36].copy_from_slice(&self.key.tag.step.to_le_bytes());
        out[36..44].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32fast::hash(&out[..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, String> {
        if bytes[0..4] != FRAME_MAGIC {
            return Err(format!(
                "bad frame magic {:02x?} (expected {:02x?})",
                &bytes[0..4],
                FRAME_MAGIC
            ));
        }
        let crc = le_u32(&bytes[44..48]);
        let actual = crc32fast::hash(&bytes[..44]);
        if crc != actual {
            return Err(format!(
                "frame header checksum mismatch (header says {crc:08x}, bytes hash to {actual:08x})"
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format!(
                "frame has protocol version {version}, this build speaks {VERSION}"
            ));
        }
        let op =
            Op::from_u8(bytes[6]).ok_or_else(|| format!("frame has unknown op {}", bytes[6]))?;
        let kind = Kind::from_u8(bytes[7])
            .ok_or_else(|| format!("frame has unknown kind {}", bytes[7]))?;
        let direction = Direction::from_u8(bytes[8])
            .ok_or_else(|| format!("frame has unknown direction {}", bytes[8]))?;
        if bytes[9] & !FLAG_PAYLOAD_CRC != 0 {
            return Err(format!("frame has unknown flags {:#04x}", bytes[9]));
        }
        if bytes[10..12] != [0, 0] {
            return Err(format!(
                "frame has non-zero reserved bytes {:02x?}",
                &bytes[10..12]
            ));
        }
        let tag = Tag {
            step: le_u64(&bytes[28..36]),
            kind,
            direction,
            micro_batch: le_u32(&bytes[20..24]),
            chunk: le_u32(&bytes[24..28]),
        };
        Ok(Self {
            sender: le_u32(&bytes[12..16]),
            key: Key {
                tag,
                op,
                group: le_u32(&bytes[16..20]),
            },
            len: le_u64(&bytes[36..44]),
            payload_crc: bytes[9] & FLAG_PAYLOAD_CRC != 0,
        })
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(bytes);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    u64::from_le_bytes(b)
}

/// Writes one frame (header, payload, trailer); `payload_crc` chooses whether the trailer is
/// the payload's CRC32 or 0.
pub(crate) fn write_frame(
    out: &mut impl Write,
    sender: u32,
    key: Key,
    payload: &[u8],
    payload_crc: bool,
) -> io::Result<()> {
    let header = Header {
        sender,
        key,
        len: payload.len() as u64,
        payload_crc,
    }
    .encode();
    let mut hasher = crc32fast::Hasher::new();
    let trailer = |hasher: crc32fast::Hasher| if payload_crc { hasher.finalize() } else { 0 };
    if payload.len() <= CHUNK {
        // Small frames go out in one write, so they travel in as few segments as possible.
        if payload_crc {
            hasher.update(payload);
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&trailer(hasher).to_le_bytes());
        return out.write_all(&buf);
    }
    out.write_all(&header)?;
    for chunk in payload.chunks(CHUNK) {
        if payload_crc {
            hasher.update(chunk);
        }
        out.write_all(chunk)?;
    }
    out.write_all(&trailer(hasher).to_le_bytes())
}

/// Why reading a frame stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The connection ended cleanly between frames.
    Closed,
    /// The connection failed or ended inside a frame (the string says where).
    Io(String),
    /// The bytes are not a valid frame (the string says what is wrong).
    Malformed(String),
}

/// Reads `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
fn read_exact_or_eof(input: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection ended after {filled} of {} bytes", buf.len()),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads the hello that opens a connection.
pub(crate) fn read_hello(input: &mut impl Read) -> Result<Hello, ReadError> {
    let mut bytes = [0u8; HELLO_LEN];
    match read_exact_or_eof(input, &mut bytes) {
        Ok(true) => Hello::decode(&bytes).map_err(ReadError::Malformed),
        Ok(false) => Err(ReadError::Closed),
        Err(e) => Err(ReadError::Io(format!("reading the hello: {e}"))),
    }
}

/// Reads one frame from `expected_sender`, refusing payloads over `max_len` bytes. The payload
/// goes into the buffer `buffer_for(len)` returns (cleared; possibly with capacity to reuse).
pub(crate) fn read_frame<R: Read>(
    input: &mut R,
    expected_sender: u32,
    max_len: u64,
    buffer_for: impl FnOnce(usize) -> Vec<u8>,
) -> Result<(Key, Vec<u8>), ReadError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    match read_exact_or_eof(input, &mut header_bytes) {
        Ok(true) => {}
        Ok(false) => return Err(ReadError::Closed),
        Err(e) => return Err(ReadError::Io(format!("reading a frame header: {e}"))),
    }
    let header = Header::decode(&header_bytes).map_err(ReadError::Malformed)?;
    if header.sender != expected_sender {
        return Err(ReadError::Malformed(format!(
            "frame claims sender rank {} on rank {expected_sender}'s connection",
            header.sender
        )));
    }
    if header.len > max_len {
        return Err(ReadError::Malformed(format!(
            "frame for {} announces {} bytes, over the {max_len}-byte limit",
            header.key, header.len
        )));
    }
    let len = usize::try_from(header.len).map_err(|_| {
        ReadError::Malformed(format!(
            "frame length {} does not fit in memory",
            header.len
        ))
    })?;
    let mut payload = buffer_for(len);
    payload.clear();
    payload.try_reserve_exact(len).map_err(|e| {
        ReadError::Malformed(format!(
            "cannot allocate {len} bytes for a frame of {}: {e}",
            header.key
        ))
    })?;
    let mut hasher = crc32fast::Hasher::new();
    while payload.len() < len {
        // `read_to_end` through `take` fills the reserved capacity without zeroing it first.
        let start = payload.len();
        let want = CHUNK.min(len - start);
        let read = (&mut *input)
            .take(want as u64)
            .read_to_end(&mut payload)
            .map_err(|e| {
                ReadError::Io(format!(
                    "reading the payload of {} ({start} of {len} bytes read): {e}",
                    header.key
                ))
            })?;
        if read != want {
            return Err(ReadError::Io(format!(
                "reading the payload of {}: connection ended after {} of {len} bytes",
                header.key,
                start + read
            )));
        }
        if header.payload_crc {
            hasher.update(&payload[start..]);
        }
    }
    let mut trailer = [0u8; 4];
    input
        .read_exact(&mut trailer)
        .map_err(|e| ReadError::Io(format!("reading the checksum of {}: {e}", header.key)))?;
    let expected = u32::from_le_bytes(trailer);
    let actual = if header.payload_crc {
        hasher.finalize()
    } else {
        0
    };
    if expected != actual && !header.payload_crc {
        return Err(ReadError::Malformed(format!(
            "frame for {} has no payload checksum but a non-zero trailer {expected:08x}",
            header.key
        )));
    }
    if expected != actual {
        return Err(ReadError::Malformed(format!(
            "payload checksum mismatch for {} ({len} bytes): trailer says {expected:08x}, payload hashes to {actual:08x}",
            header.key
        )));
    }
    Ok((header.key, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            tag: Tag::new(7, Kind::Dispatch)
                .forward()
                .micro_batch(3)
                .chunk(2),
            op: Op::AllToAll,
            group: 0xabcd,
        }
    }

    #[test]
    fn frames_round_trip_small_and_large() {
        for len in [0usize, 5, CHUNK + 17] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for crc in [true, false] {
                let mut wire = Vec::new();
                write_frame(&mut wire, 4, key(), &payload, crc).unwrap();
                assert_eq!(wire.len(), HEADER_LEN + len + 4);
                let (k, back) =
                    read_frame(&mut wire.as_slice(), 4, u64::MAX, Vec::with_capacity).unwrap();
                assert_eq!((k, &back), (key(), &payload));
            }
        }
    }

    #[test]
    fn every_defect_is_named() {
        let mut wire = Vec::new();
        write_frame(&mut wire, 4, key(), &[1, 2, 3], true).unwrap();
        let check = |bytes: &[u8], sender: u32, max: u64, want: &str| match read_frame(
            &mut &bytes[..],
            sender,
            max,
            |_| Vec::new(),
        ) {
            Err(ReadError::Malformed(m)) | Err(ReadError::Io(m)) => {
                assert!(m.contains(want), "{m} lacks {want}")
            }
            other => panic!("expected an error containing {want}, got {other:?}"),
        };
        let mut bad = wire.clone();
        bad[HEADER_LEN + 1] ^= 1;
        check(&bad, 4, u64::MAX, "payload checksum mismatch");
        let mut bad = wire.clone();
        bad[30] ^= 1;
        check(&bad, 4, u64::MAX, "header checksum mismatch");
        let mut bad = wire.clone();
        bad[0] = b'X';
        check(&bad, 4, u64::MAX, "bad frame magic");
        check(&wire, 5, u64::MAX, "claims sender rank 4");
        check(&wire, 4, 2, "over the 2-byte limit");
        check(&wire[..wire.len() - 2], 4, u64::MAX, "reading the checksum");
        check(&wire[..10], 4, u64::MAX, "after 10 of 48 bytes");
        let mut unchecked = Vec::new();
        write_frame(&mut unchecked, 4, key(), &[1, 2, 3], false).unwrap();
        let last = unchecked.len() - 1;
        unchecked[last] = 1;
        check(
            &unchecked,
            4,
            u64::MAX,
            "no payload checksum but a non-zero trailer",
        );
        assert!(matches!(
            read_frame(&mut &[][..], 4, 9, |_| Vec::new()),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn hello_round_trip_and_corruption() {
        let hello = Hello {
            sender: 3,
            world_size: 8,
            session: 99,
        };
        let mut bytes = hello.encode();
        assert_eq!(Hello::decode(&bytes), Ok(hello));
        bytes[17] ^= 1;
        assert!(
            Hello::decode(&bytes)
                .unwrap_err()
                .contains("hello checksum mismatch")
        );
    }
}
