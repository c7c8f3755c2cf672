//! The systemd notify protocol, by hand: one datagram per state change to
//! `$NOTIFY_SOCKET`. Twenty lines of std beat a C binding or a crate for this.
//!
//! - `READY=1` once every model is loaded and the broker accepted the connection,
//!   so `systemctl start` returns when the daemon can actually work;
//! - `WATCHDOG=1` while no inference has been stuck longer than the watchdog
//!   interval, so a hung model gets the service restarted;
//! - `STOPPING=1` on shutdown.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` if the service manager asked for notifications; silent otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // Abstract namespace socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        log::warn!("systemd notify ({state:?}) failed: {e}");
    }
}

/// The watchdog interval systemd expects pings within, if it set one for us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
