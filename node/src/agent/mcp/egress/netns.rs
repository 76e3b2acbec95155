//! Opening the proxy's port inside a container's own network namespace.
//!
//! A server's container keeps `--network none`: its namespace has only a loopback interface,
//! so nothing in it can reach any address. The agent node enters that namespace on one
//! short-lived thread (`setns(2)` changes only the calling thread), binds a TCP listener on
//! the container's `127.0.0.1`, and leaves; the socket stays in the container's namespace
//! while the node accepts on it. The proxy is then the container's only way out.
//!
//! Why not a Docker `internal` network: from a container on one, the bridge's gateway address
//! **and every other address of the host** answer (checked here on Docker 20.10: HTTP to a
//! host service on `0.0.0.0` worked through the gateway and through `docker0`'s address), so
//! it would need host firewall rules to be closed. A namespace with nothing but loopback needs
//! none.
//!
//! Needs the node to run as root on the Docker host (entering another process's namespace
//! takes `CAP_SYS_ADMIN` and access to `/proc/PID/ns/net`).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Binds `127.0.0.1:port` inside the network namespace of process `pid` (a container's main
/// process, as the host sees it).
pub fn listen_in(pid: i64, port: u16) -> Result<TcpListener, String> {
    if pid <= 0 {
        return Err("the container has no running process (it exited at once?)".into());
    }
    let path = format!("/proc/{pid}/ns/net");
    let join = std::thread::Builder::new()
        .name("iom-egress-netns".into())
        .spawn(move || enter_and_bind(&path, port))
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    join.join()
        .map_err(|_| "the namespace thread failed".to_string())?
}

#[cfg(target_os = "linux")]
fn enter_and_bind(path: &str, port: u16) -> Result<TcpListener, String> {
    let need_root = "egress for MCP servers needs the agent node to run as root on the Docker \
                     host (it opens the proxy's port inside the server's network namespace)";
    let ns =
        std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}; {need_root}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot enter the container's network namespace: {e}; {need_root}"))?;
    // This thread now lives in the container's namespace; it ends right after the bind.
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} in the container: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("cannot make the listener non-blocking: {e}"))?;
    Ok(l)
}

#[cfg(not(target_os = "linux"))]
fn enter_and_bind(_path: &str, _port: u16) -> Result<TcpListener, String> {
    Err("egress for MCP servers needs Linux network namespaces".into())
}
