//! What the IPVS client does with a datagram from the kernel: acknowledgements,
//! typed replies, dump replies into services and destinations, `ipvsadm -Ln`,
//! planning against the dump and the writes that send entries back (see
//! `ipvs::fuzzing::reply_datagram` for the properties asserted), and the dump
//! as JSON (`ipvs-operator ipvs dump -o json`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let parsed = ipvs::fuzzing::reply_datagram(datagram);
    serde_json::to_string(&parsed.entries).expect("a dump serializes");
});
