//! The IPVS generic netlink message: a command and its first-level attributes,
//! modelled like `netlink-packet-generic`'s own families (`GenlFamily`).

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, NLA_F_NESTED, Nla, NlaBuffer, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::constants::*;
use crate::nlas::{DestinationAttr, ServiceAttr, parse_nested, parse_other, parse_u32};

/// An IPVS generic netlink command (`IPVS_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum IpvsCmd {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    NewDaemon,
    DelDaemon,
    GetDaemon,
    SetConfig,
    GetConfig,
    /// The kernel's reply to [`IpvsCmd::GetInfo`].
    SetInfo,
    GetInfo,
    Zero,
    Flush,
}

impl From<IpvsCmd> for u8 {
    fn from(cmd: IpvsCmd) -> u8 {
        use IpvsCmd::*;
        match cmd {
            NewService => IPVS_CMD_NEW_SERVICE,
            SetService => IPVS_CMD_SET_SERVICE,
            DelService => IPVS_CMD_DEL_SERVICE,
            GetService => IPVS_CMD_GET_SERVICE,
            NewDest => IPVS_CMD_NEW_DEST,
            SetDest => IPVS_CMD_SET_DEST,
            DelDest => IPVS_CMD_DEL_DEST,
            GetDest => IPVS_CMD_GET_DEST,
            NewDaemon => IPVS_CMD_NEW_DAEMON,
            DelDaemon => IPVS_CMD_DEL_DAEMON,
            GetDaemon => IPVS_CMD_GET_DAEMON,
            SetConfig => IPVS_CMD_SET_CONFIG,
            GetConfig => IPVS_CMD_GET_CONFIG,
            SetInfo => IPVS_CMD_SET_INFO,
            GetInfo => IPVS_CMD_GET_INFO,
            Zero => IPVS_CMD_ZERO,
            Flush => IPVS_CMD_FLUSH,
        }
    }
}

impl TryFrom<u8> for IpvsCmd {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, DecodeError> {
        use IpvsCmd::*;
        Ok(match value {
            IPVS_CMD_NEW_SERVICE => NewService,
            IPVS_CMD_SET_SERVICE => SetService,
            IPVS_CMD_DEL_SERVICE => DelService,
            IPVS_CMD_GET_SERVICE => GetService,
            IPVS_CMD_NEW_DEST => NewDest,
            IPVS_CMD_SET_DEST => SetDest,
            IPVS_CMD_DEL_DEST => DelDest,
            IPVS_CMD_GET_DEST => GetDest,
            IPVS_CMD_NEW_DAEMON => NewDaemon,
            IPVS_CMD_DEL_DAEMON => DelDaemon,
            IPVS_CMD_GET_DAEMON => GetDaemon,
            IPVS_CMD_SET_CONFIG => SetConfig,
            IPVS_CMD_GET_CONFIG => GetConfig,
            IPVS_CMD_SET_INFO => SetInfo,
            IPVS_CMD_GET_INFO => GetInfo,
            IPVS_CMD_ZERO => Zero,
            IPVS_CMD_FLUSH => Flush,
            cmd => return Err(DecodeError::from(format!("unknown IPVS command {cmd}"))),
        })
    }
}

/// A first-level attribute of an IPVS message.
///
/// Which numbering applies depends on the command: the reply to `GET_INFO`
/// (`SET_INFO`) uses `IPVS_INFO_ATTR_*`, every other command `IPVS_CMD_ATTR_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsAttr {
    /// `IPVS_CMD_ATTR_SERVICE`.
    Service(Vec<ServiceAttr>),
    /// `IPVS_CMD_ATTR_DEST`.
    Destination(Vec<DestinationAttr>),
    /// `IPVS_INFO_ATTR_VERSION` (in `SET_INFO` only).
    InfoVersion(u32),
    /// `IPVS_INFO_ATTR_CONN_TAB_SIZE` (in `SET_INFO` only).
    InfoConnTabSize(u32),
    /// Anything else (daemon, timeouts, newer attributes).
    Other(DefaultNla),
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(nlas) => nlas.as_slice().buffer_len(),
            Self::Destination(nlas) => nlas.as_slice().buffer_len(),
            Self::InfoVersion(_) | Self::InfoConnTabSize(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            Self::Destination(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            Self::InfoVersion(_) => IPVS_INFO_ATTR_VERSION,
            Self::InfoConnTabSize(_) => IPVS_INFO_ATTR_CONN_TAB_SIZE,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Service(nlas) => nlas.as_slice().emit(buffer),
            Self::Destination(nlas) => nlas.as_slice().emit(buffer),
            Self::InfoVersion(v) | Self::InfoConnTabSize(v) => buffer.copy_from_slice(&v.to_ne_bytes()),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl IpvsAttr {
    fn parse(buf: &NlaBuffer<&[u8]>, cmd: IpvsCmd) -> Result<Self, DecodeError> {
        let payload = buf.value();
        if cmd == IpvsCmd::SetInfo {
            return Ok(match buf.kind() {
                IPVS_INFO_ATTR_VERSION => Self::InfoVersion(parse_u32(payload, "IPVS_INFO_ATTR_VERSION")?),
                IPVS_INFO_ATTR_CONN_TAB_SIZE => {
                    Self::InfoConnTabSize(parse_u32(payload, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?)
                }
                _ => Self::Other(parse_other(buf)?),
            });
        }
        Ok(match buf.kind() {
            IPVS_CMD_ATTR_SERVICE => {
                Self::Service(parse_nested(payload, "IPVS_CMD_ATTR_SERVICE", ServiceAttr::parse)?)
            }
            IPVS_CMD_ATTR_DEST => {
                Self::Destination(parse_nested(payload, "IPVS_CMD_ATTR_DEST", DestinationAttr::parse)?)
            }
            _ => Self::Other(parse_other(buf)?),
        })
    }
}

/// The payload of an IPVS generic netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The command.
    pub cmd: IpvsCmd,
    /// Its first-level attributes.
    pub attrs: Vec<IpvsAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    // family_id() keeps the default 0: the kernel assigns IPVS's id when the
    // module loads, so it is resolved at run time (GenlMessage::set_resolved_family_id).

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let cmd = IpvsCmd::try_from(header.cmd)?;
        let attrs = parse_nested(buf, "IPVS message", |nla| IpvsAttr::parse(nla, cmd))
            .with_context(|| format!("failed to parse IPVS {cmd:?} message"))?;
        Ok(Self { cmd, attrs })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
    use netlink_packet_generic::GenlMessage;

    use super::*;
    use crate::nlas::DestinationAttr;

    #[test]
    fn emits_a_whole_request_with_the_resolved_family_id() {
        let mut genl = GenlMessage::from_payload(IpvsMessage {
            cmd: IpvsCmd::DelDest,
            attrs: vec![IpvsAttr::Destination(vec![DestinationAttr::Port(80)])],
        });
        genl.set_resolved_family_id(0x1a);
        let mut message = NetlinkMessage::from(genl);
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        message.header.sequence_number = 7;
        message.finalize();
        let mut buf = vec![0xff; message.buffer_len()];
        message.serialize(&mut buf);
        #[rustfmt::skip]
        let expected: [u8; 32] = [
            0x20, 0x00, 0x00, 0x00, // nlmsg_len 32
            0x1a, 0x00,             // nlmsg_type: the family id resolved at run time
            0x05, 0x00,             // NLM_F_REQUEST | NLM_F_ACK
            0x07, 0x00, 0x00, 0x00, // sequence number 7
            0x00, 0x00, 0x00, 0x00, // port id 0
            0x07,                   // genl cmd IPVS_CMD_DEL_DEST
            0x01,                   // genl version IPVS_GENL_VERSION
            0x00, 0x00,             // reserved
            0x0c, 0x00, 0x02, 0x80, // length 12, IPVS_CMD_ATTR_DEST | NLA_F_NESTED
            0x06, 0x00, 0x02, 0x00, //   length 6, IPVS_DEST_ATTR_PORT
            0x00, 0x50, 0x00, 0x00, //   80 in network order, padding
        ];
        assert_eq!(buf, expected);

        let parsed = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else { panic!("{parsed:?}") };
        assert_eq!(genl.payload.cmd, IpvsCmd::DelDest);
        assert_eq!(genl.payload.attrs, vec![IpvsAttr::Destination(vec![DestinationAttr::Port(80)])]);
    }

    #[test]
    fn info_replies_use_their_own_attribute_numbers() {
        #[rustfmt::skip]
        let payload = [
            0x08, 0x00, 0x01, 0x00, // IPVS_INFO_ATTR_VERSION (same number as IPVS_CMD_ATTR_SERVICE)
            0x01, 0x02, 0x01, 0x00, // 0x010201 = 1.2.1
            0x08, 0x00, 0x02, 0x00, // IPVS_INFO_ATTR_CONN_TAB_SIZE
            0x00, 0x10, 0x00, 0x00, // 4096
        ];
        let header = GenlHeader { cmd: IPVS_CMD_SET_INFO, version: 1 };
        let message = IpvsMessage::parse_with_param(&payload[..], header).unwrap();
        assert_eq!(message.attrs, vec![IpvsAttr::InfoVersion(0x010201), IpvsAttr::InfoConnTabSize(4096)]);
    }

    #[test]
    fn an_unknown_command_is_an_error_not_a_panic() {
        let header = GenlHeader { cmd: 200, version: 1 };
        assert!(IpvsMessage::parse_with_param(&[][..], header).is_err());
    }

    #[test]
    fn commands_round_trip() {
        for raw in 1..=IPVS_CMD_FLUSH {
            let cmd = IpvsCmd::try_from(raw).unwrap();
            assert_eq!(u8::from(cmd), raw);
        }
    }
}
