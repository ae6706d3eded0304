//! `IPVS_SVC_ATTR_*`: a virtual service, nested in `IPVS_CMD_ATTR_SERVICE`.

use netlink_packet_core::{DecodeError, DefaultNla, ErrorContext, Nla, NlaBuffer, NLA_F_NESTED};

use super::{
    StatsAttr, cstr_len, emit_all, emit_cstr, len_all, parse_4_bytes, parse_be16, parse_cstr, parse_nested,
    parse_other, parse_u16, parse_u32,
};
use crate::constants::*;

/// One attribute of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAttr {
    /// `IPVS_SVC_ATTR_AF`: `AF_INET` or `AF_INET6`.
    AddressFamily(u16),
    /// `IPVS_SVC_ATTR_PROTOCOL`: an `IPPROTO_*` number.
    Protocol(u16),
    /// `IPVS_SVC_ATTR_ADDR`: `union nf_inet_addr`, 16 bytes; an IPv4 address is the first 4.
    Address(Vec<u8>),
    /// `IPVS_SVC_ATTR_PORT`: held in host order, `__be16` on the wire.
    Port(u16),
    /// `IPVS_SVC_ATTR_FWMARK`.
    Fwmark(u32),
    /// `IPVS_SVC_ATTR_SCHED_NAME`: NUL-terminated on the wire.
    SchedName(String),
    /// `IPVS_SVC_ATTR_FLAGS`: `struct ip_vs_flags`; the kernel changes only the bits in `mask`.
    Flags {
        /// The flag values (`IP_VS_SVC_F_*`).
        flags: u32,
        /// Which bits of `flags` to apply.
        mask: u32,
    },
    /// `IPVS_SVC_ATTR_TIMEOUT`: persistence timeout in seconds.
    Timeout(u32),
    /// `IPVS_SVC_ATTR_NETMASK`: the 4 bytes as on the wire. The kernel reads
    /// them as `__be32`: an IPv4 mask in network order, but an IPv6 prefix
    /// length compared as a plain number, i.e. in host order.
    Netmask([u8; 4]),
    /// `IPVS_SVC_ATTR_STATS`.
    Stats(Vec<StatsAttr>),
    /// `IPVS_SVC_ATTR_PE_NAME`: persistence engine, NUL-terminated on the wire.
    PeName(String),
    /// `IPVS_SVC_ATTR_STATS64`.
    Stats64(Vec<StatsAttr>),
    /// An attribute this crate does not know (newer kernels add some).
    Other(DefaultNla),
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::AddressFamily(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Fwmark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::Flags { .. } => 8,
            Self::Address(bytes) => bytes.len(),
            Self::SchedName(s) | Self::PeName(s) => cstr_len(s),
            Self::Stats(nlas) | Self::Stats64(nlas) => len_all(nlas),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::AddressFamily(_) => IPVS_SVC_ATTR_AF,
            Self::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            Self::Address(_) => IPVS_SVC_ATTR_ADDR,
            Self::Port(_) => IPVS_SVC_ATTR_PORT,
            Self::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            Self::SchedName(_) => IPVS_SVC_ATTR_SCHED_NAME,
            Self::Flags { .. } => IPVS_SVC_ATTR_FLAGS,
            Self::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            Self::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            Self::Stats(_) => IPVS_SVC_ATTR_STATS | NLA_F_NESTED,
            Self::PeName(_) => IPVS_SVC_ATTR_PE_NAME,
            Self::Stats64(_) => IPVS_SVC_ATTR_STATS64 | NLA_F_NESTED,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::AddressFamily(v) | Self::Protocol(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            // The classic bug: netlink integers are host order, but IPVS ports are __be16.
            Self::Port(port) => buffer.copy_from_slice(&port.to_be_bytes()),
            Self::Fwmark(v) | Self::Timeout(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            Self::Netmask(bytes) => buffer.copy_from_slice(bytes),
            Self::Flags { flags, mask } => {
                buffer[..4].copy_from_slice(&flags.to_ne_bytes());
                buffer[4..8].copy_from_slice(&mask.to_ne_bytes());
            }
            Self::Address(bytes) => buffer.copy_from_slice(bytes),
            Self::SchedName(s) | Self::PeName(s) => emit_cstr(s, buffer),
            Self::Stats(nlas) | Self::Stats64(nlas) => emit_all(nlas, buffer),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl ServiceAttr {
    /// Parses one service attribute; unknown types become [`ServiceAttr::Other`].
    pub fn parse(buf: &NlaBuffer<&[u8]>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        Ok(match buf.kind() {
            IPVS_SVC_ATTR_AF => Self::AddressFamily(parse_u16(payload, "IPVS_SVC_ATTR_AF")?),
            IPVS_SVC_ATTR_PROTOCOL => Self::Protocol(parse_u16(payload, "IPVS_SVC_ATTR_PROTOCOL")?),
            IPVS_SVC_ATTR_ADDR => Self::Address(payload.to_vec()),
            IPVS_SVC_ATTR_PORT => Self::Port(parse_be16(payload, "IPVS_SVC_ATTR_PORT")?),
            IPVS_SVC_ATTR_FWMARK => Self::Fwmark(parse_u32(payload, "IPVS_SVC_ATTR_FWMARK")?),
            IPVS_SVC_ATTR_SCHED_NAME => Self::SchedName(parse_cstr(payload, "IPVS_SVC_ATTR_SCHED_NAME")?),
            IPVS_SVC_ATTR_FLAGS => {
                let name = "IPVS_SVC_ATTR_FLAGS";
                if payload.len() != 8 {
                    return Err(DecodeError::from(format!("{name}: expected 8 bytes, got {}", payload.len())));
                }
                Self::Flags {
                    flags: parse_u32(&payload[..4], name)?,
                    mask: parse_u32(&payload[4..], name)?,
                }
            }
            IPVS_SVC_ATTR_TIMEOUT => Self::Timeout(parse_u32(payload, "IPVS_SVC_ATTR_TIMEOUT")?),
            IPVS_SVC_ATTR_NETMASK => Self::Netmask(parse_4_bytes(payload, "IPVS_SVC_ATTR_NETMASK")?),
            IPVS_SVC_ATTR_STATS => {
                Self::Stats(parse_nested(payload, "IPVS_SVC_ATTR_STATS", StatsAttr::parse)?)
            }
            IPVS_SVC_ATTR_PE_NAME => Self::PeName(parse_cstr(payload, "IPVS_SVC_ATTR_PE_NAME")?),
            IPVS_SVC_ATTR_STATS64 => {
                Self::Stats64(parse_nested(payload, "IPVS_SVC_ATTR_STATS64", StatsAttr::parse)?)
            }
            _ => Self::Other(parse_other(buf).context("unknown service attribute")?),
        })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use netlink_packet_core::{Emitable, NlaBuffer};

    use super::*;
    use crate::nlas::parse_nested;

    /// The attributes of `TCP 10.0.0.1:8080` as ipvsadm sends them.
    #[rustfmt::skip]
    const TCP_10_0_0_1_8080: [u8; 44] = [
        0x06, 0x00, 0x01, 0x00, // length 6, IPVS_SVC_ATTR_AF
        0x02, 0x00, 0x00, 0x00, // AF_INET (host order), 2 bytes padding
        0x06, 0x00, 0x02, 0x00, // length 6, IPVS_SVC_ATTR_PROTOCOL
        0x06, 0x00, 0x00, 0x00, // IPPROTO_TCP, padding
        0x14, 0x00, 0x03, 0x00, // length 20, IPVS_SVC_ATTR_ADDR
        0x0a, 0x00, 0x00, 0x01, // 10.0.0.1
        0x00, 0x00, 0x00, 0x00, // the rest of union nf_inet_addr
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x06, 0x00, 0x04, 0x00, // length 6, IPVS_SVC_ATTR_PORT
        0x1f, 0x90, 0x00, 0x00, // 8080 in NETWORK order (0x1f90), padding
    ];

    #[test]
    fn emits_a_service_key_with_the_port_in_network_order() {
        let attrs = vec![
            ServiceAttr::AddressFamily(AF_INET),
            ServiceAttr::Protocol(IPPROTO_TCP),
            ServiceAttr::Address(vec![10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ServiceAttr::Port(8080),
        ];
        let mut buf = vec![0xff; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut buf);
        assert_eq!(buf, TCP_10_0_0_1_8080);
    }

    #[test]
    fn parses_a_service_key_and_reads_the_port_in_network_order() {
        let attrs = parse_nested(&TCP_10_0_0_1_8080, "test", ServiceAttr::parse).unwrap();
        assert_eq!(attrs[3], ServiceAttr::Port(8080), "0x1f90 on the wire is 8080, not 36895");
    }

    /// A service as the kernel dumps it, with an attribute from the future.
    #[rustfmt::skip]
    const KERNEL_SERVICE: &[u8] = &[
        0x06, 0x00, 0x01, 0x00, // IPVS_SVC_ATTR_AF
        0x0a, 0x00, 0x00, 0x00, // AF_INET6
        0x06, 0x00, 0x02, 0x00, // IPVS_SVC_ATTR_PROTOCOL
        0x11, 0x00, 0x00, 0x00, // IPPROTO_UDP
        0x14, 0x00, 0x03, 0x00, // IPVS_SVC_ATTR_ADDR, 16 bytes
        0xfd, 0x00, 0x00, 0x00, // fd00::53
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x53,
        0x06, 0x00, 0x04, 0x00, // IPVS_SVC_ATTR_PORT
        0x00, 0x35, 0x00, 0x00, // 53, network order
        0x08, 0x00, 0x06, 0x00, // IPVS_SVC_ATTR_SCHED_NAME, length 8
        b'w', b'r', b'r', 0x00, // "wrr\0"
        0x0c, 0x00, 0x07, 0x00, // IPVS_SVC_ATTR_FLAGS, struct ip_vs_flags
        0x02, 0x00, 0x00, 0x00, // flags: IP_VS_SVC_F_HASHED
        0xff, 0xff, 0xff, 0xff, // mask
        0x08, 0x00, 0x08, 0x00, // IPVS_SVC_ATTR_TIMEOUT
        0x00, 0x00, 0x00, 0x00, // 0 s
        0x08, 0x00, 0x09, 0x00, // IPVS_SVC_ATTR_NETMASK
        0x80, 0x00, 0x00, 0x00, // IPv6: prefix length 128, host order
        0x10, 0x00, 0x0a, 0x00, // IPVS_SVC_ATTR_STATS, nested, length 16
        0x08, 0x00, 0x01, 0x00, //   IPVS_STATS_ATTR_CONNS
        0x07, 0x00, 0x00, 0x00, //   7 (32 bits)
        0x04, 0x00, 0x0b, 0x00, //   IPVS_STATS_ATTR_PAD, empty
        0x08, 0x00, 0x63, 0x00, // type 99: unknown to this crate
        0xde, 0xad, 0xbe, 0xef, // whatever it holds
    ];

    #[test]
    fn parses_what_the_kernel_dumps_and_keeps_unknown_attributes_aside() {
        let attrs = parse_nested(KERNEL_SERVICE, "test", ServiceAttr::parse).unwrap();
        assert_eq!(attrs[0], ServiceAttr::AddressFamily(AF_INET6));
        assert_eq!(attrs[1], ServiceAttr::Protocol(IPPROTO_UDP));
        assert_eq!(attrs[3], ServiceAttr::Port(53));
        assert_eq!(attrs[4], ServiceAttr::SchedName("wrr".into()));
        assert_eq!(attrs[5], ServiceAttr::Flags { flags: IP_VS_SVC_F_HASHED, mask: u32::MAX });
        assert_eq!(attrs[7], ServiceAttr::Netmask([0x80, 0, 0, 0]));
        let ServiceAttr::Stats(stats) = &attrs[8] else { panic!("not stats: {:?}", attrs[8]) };
        assert_eq!(stats[0], StatsAttr::Counter { kind: IPVS_STATS_ATTR_CONNS, value: 7, wide: false });
        assert!(matches!(stats[1], StatsAttr::Other(_)));
        let ServiceAttr::Other(unknown) = &attrs[9] else { panic!("not other: {:?}", attrs[9]) };
        assert_eq!(unknown.kind(), 99);
    }

    #[test]
    fn a_known_attribute_of_the_wrong_size_is_an_error_not_a_panic() {
        // IPVS_SVC_ATTR_PORT with 4 bytes instead of 2.
        let bytes = [0x08, 0x00, 0x04, 0x00, 0x00, 0x50, 0x00, 0x00];
        let err = ServiceAttr::parse(&NlaBuffer::new_checked(&bytes[..]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("IPVS_SVC_ATTR_PORT"), "{err}");
    }

    #[test]
    fn truncated_or_corrupted_input_never_panics() {
        for len in 0..KERNEL_SERVICE.len() {
            let _ = parse_nested(&KERNEL_SERVICE[..len], "test", ServiceAttr::parse);
        }
        for i in 0..KERNEL_SERVICE.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bytes = KERNEL_SERVICE.to_vec();
                bytes[i] = value;
                let _ = parse_nested(&bytes, "test", ServiceAttr::parse);
            }
        }
    }
}
