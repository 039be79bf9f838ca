//! TCP_NODELAY on database connections. sqlx 0.9.0 leaves Nagle's algorithm on (a regression,
//! sqlx issue #4335, fixed upstream after 0.9.0), which with delayed ACKs stalls a small COPY's
//! last message by ~40 ms, per file. Until a release carries the fix, each new connection finds
//! its own socket among the process's descriptors by its two ports and turns Nagle off.

use std::os::fd::BorrowedFd;

use socket2::SockRef;

/// Turns Nagle's algorithm off on the TCP socket connected from `local_port` to `peer_port`.
/// Returns whether such a socket was found.
pub fn set_nodelay(local_port: u16, peer_port: u16) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    for entry in entries.flatten() {
        let Some(raw) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: the descriptor was open when listed. Should another thread close (and reuse)
        // it meanwhile, the calls below fail or touch another socket's ports, which are then
        // checked, and setting TCP_NODELAY is harmless to any TCP socket anyway.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let socket = SockRef::from(&fd);
        let port = |a: std::io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket()).map(|a| a.port());
        if port(socket.local_addr()) == Some(local_port) && port(socket.peer_addr()) == Some(peer_port) {
            return socket.set_tcp_nodelay(true).is_ok();
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_connection_s_own_socket_is_found_and_set() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (local, peer) = (client.local_addr().unwrap().port(), client.peer_addr().unwrap().port());
        assert!(!client.nodelay().unwrap());
        assert!(super::set_nodelay(local, peer));
        assert!(client.nodelay().unwrap());
        assert!(!super::set_nodelay(1, 2));
    }
}
