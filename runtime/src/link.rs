//! The QUIC transport settings of the agent link, built from the shared
//! constants in `servitor_proto::link` so both ends apply the same ones.
//!
//! Not responsible for TLS (each end has its own verifier) nor for what
//! travels on the link.

use servitor_proto::link::{IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL};

/// The QUIC transport settings of the link, the same at both ends.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
            .expect("twenty seconds fits in a QUIC idle timeout"),
    ));
    transport
}

/// A close or stream code from `servitor_proto::link` as QUIC's integer.
pub fn code(value: u32) -> quinn::VarInt {
    quinn::VarInt::from_u32(value)
}
