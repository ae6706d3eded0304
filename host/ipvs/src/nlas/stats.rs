//! `IPVS_STATS_ATTR_*`: counters and rates nested in `IPVS_SVC_ATTR_STATS[64]`
//! and `IPVS_DEST_ATTR_STATS[64]`.

use netlink_packet_core::{DecodeError, DefaultNla, Nla, NlaBuffer};

use super::{parse_other, parse_u32, parse_u64};
use crate::constants::*;

/// One statistics attribute.
///
/// In `*_STATS` the connection and packet counters and the rates are 32 bits
/// and the byte counters 64; in `*_STATS64` everything is 64 bits. `wide`
/// records which, so that emitting reproduces the kernel's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsAttr {
    /// `IPVS_STATS_ATTR_CONNS` … `IPVS_STATS_ATTR_OUTBPS`: `kind` is the attribute type.
    Counter {
        /// The `IPVS_STATS_ATTR_*` type.
        kind: u16,
        /// The value, widened to 64 bits.
        value: u64,
        /// True when the attribute is 64 bits on the wire.
        wide: bool,
    },
    /// `IPVS_STATS_ATTR_PAD` and attributes newer than this crate.
    Other(DefaultNla),
}

impl Nla for StatsAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Counter { wide: true, .. } => 8,
            Self::Counter { wide: false, .. } => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Counter { kind, .. } => *kind,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Counter { value, wide: true, .. } => buffer.copy_from_slice(&value.to_ne_bytes()),
            // A 32-bit counter never holds more than 32 bits: it was parsed from 4 bytes.
            Self::Counter { value, wide: false, .. } => buffer.copy_from_slice(&(*value as u32).to_ne_bytes()),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl StatsAttr {
    /// Parses one statistics attribute; 4- and 8-byte counters are both accepted.
    pub fn parse(buf: &NlaBuffer<&[u8]>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        match buf.kind() {
            kind @ IPVS_STATS_ATTR_CONNS..=IPVS_STATS_ATTR_OUTBPS => {
                let name = "IPVS_STATS_ATTR";
                let (value, wide) = match payload.len() {
                    8 => (parse_u64(payload, name)?, true),
                    _ => (u64::from(parse_u32(payload, name)?), false),
                };
                Ok(Self::Counter { kind, value, wide })
            }
            _ => Ok(Self::Other(parse_other(buf)?)),
        }
    }
}
