//! The QUIC transport settings of the agent link, built from the shared
//! constants in `servitor_proto::link` so both ends apply the same ones.
//!
//! Not responsible for TLS (each end has its own verifier) nor for what
//! travels on the link.

use std::net::SocketAddr;

use servitor_proto::link::{IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL};
use socket2::{Domain, Protocol, Socket, Type};

/// Kernel buffer asked for each direction of the link's UDP socket. The
/// usual default (208 KiB) holds a few milliseconds of a thousand agents'
/// output; when the endpoint is not read within that time, the kernel drops
/// packets, QUIC takes the loss for congestion, and heartbeats wait behind
/// retransmissions until links time out. QUIC stacks ask for about this
/// much (quic-go: 7 MiB).
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A bound UDP socket for the link, and the receive buffer the kernel gave
/// it.
#[derive(Debug)]
pub struct LinkSocket {
    pub socket: std::net::UdpSocket,
    /// Bytes the kernel reports for the receive buffer (Linux reports
    /// twice what it grants, its own bookkeeping included).
    pub receive_buffer: usize,
}

impl LinkSocket {
    /// Whether the kernel granted less receive buffer than asked for
    /// (capped by `net.core.rmem_max`): say so, with the fix, once.
    pub fn short_of_buffer(&self) -> bool {
        self.receive_buffer < SOCKET_BUFFER_BYTES
    }
}

/// Binds the link's UDP socket at `addr`, asking for [`SOCKET_BUFFER_BYTES`]
/// of kernel buffer each way (the kernel may grant less; see
/// [`LinkSocket::short_of_buffer`]).
///
/// # Errors
/// The socket cannot be created or bound.
pub fn bind_socket(addr: SocketAddr) -> std::io::Result<LinkSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Refusals only leave the default; the caller reports what it got.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    let receive_buffer = socket.recv_buffer_size()?;
    Ok(LinkSocket {
        socket: socket.into(),
        receive_buffer,
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_socket_gets_the_buffer_the_system_allows() {
        let bound = bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(bound.socket.local_addr().unwrap().port() > 0);
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let default: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_default")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Linux grants up to rmem_max and reports twice what it grants.
        let granted = SOCKET_BUFFER_BYTES.min(max).max(default);
        assert!(
            bound.receive_buffer >= granted,
            "asked for {SOCKET_BUFFER_BYTES}, rmem_max {max}: got {}",
            bound.receive_buffer
        );
        assert_eq!(bound.short_of_buffer(), 2 * granted < SOCKET_BUFFER_BYTES);
    }
}
