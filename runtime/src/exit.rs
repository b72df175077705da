//! Exit codes: the contract with systemd. The units restart on failure and
//! list [`CONFIG`] in `RestartPreventExitStatus`, so a process that cannot
//! work until a person fixes something does not restart in a loop.

/// Transient failure: systemd restarts the service (`Restart=on-failure`).
pub const TRANSIENT: u8 = 1;
/// Bad configuration or usage: a restart cannot help
/// (`RestartPreventExitStatus=64`, as sysexits' `EX_USAGE`).
pub const CONFIG: u8 = 64;
