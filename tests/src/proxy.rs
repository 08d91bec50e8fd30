//! A TCP proxy between clients and a node, to simulate network failures.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    /// Proxied connections, to cut them.
    conns: Vec<AbortHandle>,
    /// While set, new connections are closed at once.
    paused: bool,
    accepted: usize,
}

/// Forwards every TCP connection it accepts to the upstream address.
#[derive(Debug)]
pub struct TcpProxy {
    /// The proxy's own address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// A proxy on `127.0.0.1:0` forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(Mutex::new(State { upstream, conns: Vec::new(), paused: false, accepted: 0 }));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { return };
                let (upstream, paused) = {
                    let mut s = st.lock().expect("proxy state");
                    s.accepted += 1;
                    (s.upstream, s.paused)
                };
                if paused {
                    drop(down);
                    continue;
                }
                let task = tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else { return };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
                let mut s = st.lock().expect("proxy state");
                s.conns.retain(|c| !c.is_finished());
                s.conns.push(task.abort_handle());
            }
        });
        TcpProxy { addr, state, accept }
    }

    /// `ws://PROXY/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Drops every proxied connection (both sides see the TCP connection end). Returns how
    /// many were open.
    pub fn cut_all(&self) -> usize {
        let mut s = self.state.lock().expect("proxy state");
        let conns = std::mem::take(&mut s.conns);
        let open = conns.iter().filter(|c| !c.is_finished()).count();
        for c in conns {
            c.abort();
        }
        open
    }

    /// While paused, new connections are accepted and closed at once (the network is
    /// down); existing ones are not touched.
    pub fn set_paused(&self, paused: bool) {
        self.state.lock().expect("proxy state").paused = paused;
    }

    /// Forwards new connections to another address (e.g. a restarted node).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.state.lock().expect("proxy state").upstream = upstream;
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.lock().expect("proxy state").accepted
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}
