//! `IPVS_DEST_ATTR_*`: a destination (real server), nested in `IPVS_CMD_ATTR_DEST`.

use netlink_packet_core::{DecodeError, DefaultNla, ErrorContext, Nla, NlaBuffer, NLA_F_NESTED};

use super::{StatsAttr, emit_all, len_all, parse_be16, parse_nested, parse_other, parse_u8, parse_u16, parse_u32};
use crate::constants::*;

/// One attribute of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationAttr {
    /// `IPVS_DEST_ATTR_ADDR`: `union nf_inet_addr`, 16 bytes; an IPv4 address is the first 4.
    Address(Vec<u8>),
    /// `IPVS_DEST_ATTR_PORT`: held in host order, `__be16` on the wire.
    Port(u16),
    /// `IPVS_DEST_ATTR_FWD_METHOD`: `IP_VS_CONN_F_*` masked by `IP_VS_CONN_F_FWD_MASK`.
    ForwardMethod(u32),
    /// `IPVS_DEST_ATTR_WEIGHT`: an `int` in the kernel, never negative.
    Weight(u32),
    /// `IPVS_DEST_ATTR_U_THRESH`: upper connection threshold (0 = none).
    UpperThreshold(u32),
    /// `IPVS_DEST_ATTR_L_THRESH`: lower connection threshold.
    LowerThreshold(u32),
    /// `IPVS_DEST_ATTR_ACTIVE_CONNS`.
    ActiveConnections(u32),
    /// `IPVS_DEST_ATTR_INACT_CONNS`.
    InactiveConnections(u32),
    /// `IPVS_DEST_ATTR_PERSIST_CONNS`.
    PersistentConnections(u32),
    /// `IPVS_DEST_ATTR_STATS`.
    Stats(Vec<StatsAttr>),
    /// `IPVS_DEST_ATTR_ADDR_FAMILY`: missing on kernels older than 3.18 (then: the service's).
    AddressFamily(u16),
    /// `IPVS_DEST_ATTR_STATS64`.
    Stats64(Vec<StatsAttr>),
    /// `IPVS_DEST_ATTR_TUN_TYPE`: `IP_VS_CONN_F_TUNNEL_TYPE_*`.
    TunnelType(u8),
    /// `IPVS_DEST_ATTR_TUN_PORT`: held in host order, `__be16` on the wire.
    TunnelPort(u16),
    /// `IPVS_DEST_ATTR_TUN_FLAGS`: `IP_VS_TUNNEL_ENCAP_FLAG_*`.
    TunnelFlags(u16),
    /// An attribute this crate does not know (newer kernels add some).
    Other(DefaultNla),
}

impl Nla for DestinationAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Address(bytes) => bytes.len(),
            Self::Port(_) | Self::AddressFamily(_) | Self::TunnelPort(_) | Self::TunnelFlags(_) => 2,
            Self::TunnelType(_) => 1,
            Self::ForwardMethod(_)
            | Self::Weight(_)
            | Self::UpperThreshold(_)
            | Self::LowerThreshold(_)
            | Self::ActiveConnections(_)
            | Self::InactiveConnections(_)
            | Self::PersistentConnections(_) => 4,
            Self::Stats(nlas) | Self::Stats64(nlas) => len_all(nlas),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Address(_) => IPVS_DEST_ATTR_ADDR,
            Self::Port(_) => IPVS_DEST_ATTR_PORT,
            Self::ForwardMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            Self::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            Self::UpperThreshold(_) => IPVS_DEST_ATTR_U_THRESH,
            Self::LowerThreshold(_) => IPVS_DEST_ATTR_L_THRESH,
            Self::ActiveConnections(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            Self::InactiveConnections(_) => IPVS_DEST_ATTR_INACT_CONNS,
            Self::PersistentConnections(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            Self::Stats(_) => IPVS_DEST_ATTR_STATS | NLA_F_NESTED,
            Self::AddressFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            Self::Stats64(_) => IPVS_DEST_ATTR_STATS64 | NLA_F_NESTED,
            Self::TunnelType(_) => IPVS_DEST_ATTR_TUN_TYPE,
            Self::TunnelPort(_) => IPVS_DEST_ATTR_TUN_PORT,
            Self::TunnelFlags(_) => IPVS_DEST_ATTR_TUN_FLAGS,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Address(bytes) => buffer.copy_from_slice(bytes),
            // Ports are __be16 inside IPVS attributes (see nlas/mod.rs).
            Self::Port(port) | Self::TunnelPort(port) => buffer.copy_from_slice(&port.to_be_bytes()),
            Self::AddressFamily(v) | Self::TunnelFlags(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            Self::TunnelType(v) => buffer[0] = *v,
            Self::ForwardMethod(v)
            | Self::Weight(v)
            | Self::UpperThreshold(v)
            | Self::LowerThreshold(v)
            | Self::ActiveConnections(v)
            | Self::InactiveConnections(v)
            | Self::PersistentConnections(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            Self::Stats(nlas) | Self::Stats64(nlas) => emit_all(nlas, buffer),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl DestinationAttr {
    /// Parses one destination attribute; unknown types become [`DestinationAttr::Other`].
    pub fn parse(buf: &NlaBuffer<&[u8]>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        Ok(match buf.kind() {
            IPVS_DEST_ATTR_ADDR => Self::Address(payload.to_vec()),
            IPVS_DEST_ATTR_PORT => Self::Port(parse_be16(payload, "IPVS_DEST_ATTR_PORT")?),
            IPVS_DEST_ATTR_FWD_METHOD => Self::ForwardMethod(parse_u32(payload, "IPVS_DEST_ATTR_FWD_METHOD")?),
            IPVS_DEST_ATTR_WEIGHT => Self::Weight(parse_u32(payload, "IPVS_DEST_ATTR_WEIGHT")?),
            IPVS_DEST_ATTR_U_THRESH => Self::UpperThreshold(parse_u32(payload, "IPVS_DEST_ATTR_U_THRESH")?),
            IPVS_DEST_ATTR_L_THRESH => Self::LowerThreshold(parse_u32(payload, "IPVS_DEST_ATTR_L_THRESH")?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => {
                Self::ActiveConnections(parse_u32(payload, "IPVS_DEST_ATTR_ACTIVE_CONNS")?)
            }
            IPVS_DEST_ATTR_INACT_CONNS => {
                Self::InactiveConnections(parse_u32(payload, "IPVS_DEST_ATTR_INACT_CONNS")?)
            }
            IPVS_DEST_ATTR_PERSIST_CONNS => {
                Self::PersistentConnections(parse_u32(payload, "IPVS_DEST_ATTR_PERSIST_CONNS")?)
            }
            IPVS_DEST_ATTR_STATS => Self::Stats(parse_nested(payload, "IPVS_DEST_ATTR_STATS", StatsAttr::parse)?),
            IPVS_DEST_ATTR_ADDR_FAMILY => {
                Self::AddressFamily(parse_u16(payload, "IPVS_DEST_ATTR_ADDR_FAMILY")?)
            }
            IPVS_DEST_ATTR_STATS64 => {
                Self::Stats64(parse_nested(payload, "IPVS_DEST_ATTR_STATS64", StatsAttr::parse)?)
            }
            IPVS_DEST_ATTR_TUN_TYPE => Self::TunnelType(parse_u8(payload, "IPVS_DEST_ATTR_TUN_TYPE")?),
            IPVS_DEST_ATTR_TUN_PORT => Self::TunnelPort(parse_be16(payload, "IPVS_DEST_ATTR_TUN_PORT")?),
            IPVS_DEST_ATTR_TUN_FLAGS => Self::TunnelFlags(parse_u16(payload, "IPVS_DEST_ATTR_TUN_FLAGS")?),
            _ => Self::Other(parse_other(buf).context("unknown destination attribute")?),
        })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;
    use crate::nlas::parse_nested;

    /// A destination as a 6.1 kernel dumps it (stats left out), plus an
    /// attribute from the future.
    #[rustfmt::skip]
    const KERNEL_DEST: &[u8] = &[
        0x14, 0x00, 0x01, 0x00, // IPVS_DEST_ATTR_ADDR, 16 bytes
        0x0a, 0xf4, 0x01, 0x05, // 10.244.1.5
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x06, 0x00, 0x02, 0x00, // IPVS_DEST_ATTR_PORT
        0x1f, 0x90, 0x00, 0x00, // 8080, network order
        0x08, 0x00, 0x03, 0x00, // IPVS_DEST_ATTR_FWD_METHOD
        0x02, 0x00, 0x00, 0x00, // IP_VS_CONN_F_TUNNEL
        0x08, 0x00, 0x04, 0x00, // IPVS_DEST_ATTR_WEIGHT
        0x2c, 0x01, 0x00, 0x00, // 300
        0x08, 0x00, 0x05, 0x00, // IPVS_DEST_ATTR_U_THRESH
        0x64, 0x00, 0x00, 0x00, // 100
        0x08, 0x00, 0x06, 0x00, // IPVS_DEST_ATTR_L_THRESH
        0x0a, 0x00, 0x00, 0x00, // 10
        0x08, 0x00, 0x07, 0x00, // IPVS_DEST_ATTR_ACTIVE_CONNS
        0x03, 0x00, 0x00, 0x00, // 3
        0x08, 0x00, 0x08, 0x00, // IPVS_DEST_ATTR_INACT_CONNS
        0x04, 0x00, 0x00, 0x00, // 4
        0x08, 0x00, 0x09, 0x00, // IPVS_DEST_ATTR_PERSIST_CONNS
        0x00, 0x00, 0x00, 0x00, // 0
        0x06, 0x00, 0x0b, 0x00, // IPVS_DEST_ATTR_ADDR_FAMILY
        0x02, 0x00, 0x00, 0x00, // AF_INET
        0x05, 0x00, 0x0d, 0x00, // IPVS_DEST_ATTR_TUN_TYPE
        0x01, 0x00, 0x00, 0x00, // GUE, 3 bytes padding
        0x06, 0x00, 0x0e, 0x00, // IPVS_DEST_ATTR_TUN_PORT
        0x17, 0xc1, 0x00, 0x00, // 6081, network order
        0x06, 0x00, 0x0f, 0x00, // IPVS_DEST_ATTR_TUN_FLAGS
        0x01, 0x00, 0x00, 0x00, // IP_VS_TUNNEL_ENCAP_FLAG_CSUM
        0x08, 0x00, 0x10, 0x00, // type 16: unknown to this crate
        0x01, 0x02, 0x03, 0x04,
    ];

    #[test]
    fn parses_what_the_kernel_dumps() {
        let attrs = parse_nested(KERNEL_DEST, "test", DestinationAttr::parse).unwrap();
        assert_eq!(attrs[1], DestinationAttr::Port(8080));
        assert_eq!(attrs[2], DestinationAttr::ForwardMethod(IP_VS_CONN_F_TUNNEL));
        assert_eq!(attrs[3], DestinationAttr::Weight(300));
        assert_eq!(attrs[4], DestinationAttr::UpperThreshold(100));
        assert_eq!(attrs[5], DestinationAttr::LowerThreshold(10));
        assert_eq!(attrs[10], DestinationAttr::TunnelType(IP_VS_CONN_F_TUNNEL_TYPE_GUE));
        assert_eq!(attrs[11], DestinationAttr::TunnelPort(6081));
        assert_eq!(attrs[12], DestinationAttr::TunnelFlags(1));
        assert!(matches!(attrs[13], DestinationAttr::Other(_)));
    }

    #[test]
    fn emits_what_it_parsed_except_the_unknown_attribute() {
        let mut attrs = parse_nested(KERNEL_DEST, "test", DestinationAttr::parse).unwrap();
        attrs.pop();
        let mut buf = vec![0; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut buf);
        assert_eq!(buf, KERNEL_DEST[..KERNEL_DEST.len() - 8]);
    }

    #[test]
    fn truncated_or_corrupted_input_never_panics() {
        for len in 0..KERNEL_DEST.len() {
            let _ = parse_nested(&KERNEL_DEST[..len], "test", DestinationAttr::parse);
        }
        for i in 0..KERNEL_DEST.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bytes = KERNEL_DEST.to_vec();
                bytes[i] = value;
                let _ = parse_nested(&bytes, "test", DestinationAttr::parse);
            }
        }
    }
}
