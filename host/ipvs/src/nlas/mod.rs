//! The IPVS netlink attributes, one file per nested attribute set of
//! `include/uapi/linux/ip_vs.h`.
//!
//! These are the wire-level types: each implements [`Nla`] (emit) and
//! [`Parseable`] (parse). Attributes this crate does not know are kept as
//! [`DefaultNla`] (`Other`) and skipped by the typed layer, so that newer
//! kernels, which add attributes, still parse.
//!
//! Byte order: netlink attributes are in host byte order, except the ones the
//! kernel declares `__be16`/`__be32` (ports, the IPv4 netmask). Those variants
//! hold the value in host order and convert on the wire.

mod destination;
mod service;
mod stats;

pub use destination::DestinationAttr;
pub use service::ServiceAttr;
pub use stats::StatsAttr;

use netlink_packet_core::{DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, NlasIterator, Parseable};

/// Parses every attribute of a nested set with `parse`, naming the set on error.
pub(crate) fn parse_nested<T>(
    payload: &[u8],
    set: &str,
    parse: impl Fn(&NlaBuffer<&[u8]>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    NlasIterator::new(payload)
        .map(|nla| nla.and_then(|nla| parse(&nla)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to parse the {set} attributes"))
}

/// Emits a list of attributes into `buffer` (which is exactly their length).
pub(crate) fn emit_all<T: Nla>(nlas: &[T], buffer: &mut [u8]) {
    nlas.emit(buffer)
}

/// The length of a list of attributes on the wire.
pub(crate) fn len_all<T: Nla>(nlas: &[T]) -> usize {
    nlas.buffer_len()
}

/// A NUL-terminated string attribute: the kernel's `NLA_NUL_STRING` needs the NUL.
pub(crate) fn cstr_len(s: &str) -> usize {
    s.len() + 1
}

pub(crate) fn emit_cstr(s: &str, buffer: &mut [u8]) {
    buffer[..s.len()].copy_from_slice(s.as_bytes());
    buffer[s.len()] = 0;
}

/// Reads a string up to its first NUL (the kernel pads some strings).
pub(crate) fn parse_cstr(payload: &[u8], name: &str) -> Result<String, DecodeError> {
    let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
    String::from_utf8(payload[..end].to_vec()).map_err(|e| DecodeError::from(format!("{name}: {e}")))
}

fn exact<const N: usize>(payload: &[u8], name: &str) -> Result<[u8; N], DecodeError> {
    payload
        .try_into()
        .map_err(|_| DecodeError::from(format!("{name}: expected {N} bytes, got {}", payload.len())))
}

pub(crate) fn parse_u8(payload: &[u8], name: &str) -> Result<u8, DecodeError> {
    exact::<1>(payload, name).map(|b| b[0])
}

pub(crate) fn parse_u16(payload: &[u8], name: &str) -> Result<u16, DecodeError> {
    exact::<2>(payload, name).map(u16::from_ne_bytes)
}

/// A `__be16` attribute (ports): network byte order on the wire.
pub(crate) fn parse_be16(payload: &[u8], name: &str) -> Result<u16, DecodeError> {
    exact::<2>(payload, name).map(u16::from_be_bytes)
}

pub(crate) fn parse_u32(payload: &[u8], name: &str) -> Result<u32, DecodeError> {
    exact::<4>(payload, name).map(u32::from_ne_bytes)
}

pub(crate) fn parse_u64(payload: &[u8], name: &str) -> Result<u64, DecodeError> {
    exact::<8>(payload, name).map(u64::from_ne_bytes)
}

pub(crate) fn parse_4_bytes(payload: &[u8], name: &str) -> Result<[u8; 4], DecodeError> {
    exact::<4>(payload, name)
}

pub(crate) fn parse_other(buf: &NlaBuffer<&[u8]>) -> Result<DefaultNla, DecodeError> {
    DefaultNla::parse(buf)
}
