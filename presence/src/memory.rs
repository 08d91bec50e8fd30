//! [`MemoryPresence`]: presence kept in this process (single node).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use roomcast_protocol::{Member, Room};

use crate::{NodeInfo, Presence, PresenceStats, Reaped};

/// Single-node presence. Cloning shares the same rooms.
///
/// Its only node is the one it lives in: members die with the process, so `reap` never
/// finds anything, and `nodes` is this node after its first heartbeat.
#[derive(Clone, Default)]
pub struct MemoryPresence {
    /// Members by room, then by client id, with each user's connection count in the room.
    /// Rooms with no members are removed.
    rooms: Arc<Mutex<HashMap<Room, RoomMembers>>>,
    /// This node's last heartbeat.
    node: Arc<Mutex<Option<(NodeInfo, Instant)>>>,
}

#[derive(Default)]
struct RoomMembers {
    by_client: HashMap<String, Member>,
    users: HashMap<String, u32>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }
}

impl Presence for MemoryPresence {
    type Error = Infallible;

    async fn add(&self, room: &Room, member: &Member) -> Result<(), Infallible> {
        let mut rooms = self.rooms.lock();
        let r = rooms.entry(room.clone()).or_default();
        if let Some(old) = r.by_client.insert(member.client.clone(), member.clone()) {
            dec(&mut r.users, &old.user);
        }
        *r.users.entry(member.user.clone()).or_default() += 1;
        Ok(())
    }

    async fn remove(&self, room: &Room, client: &str) -> Result<(), Infallible> {
        let mut rooms = self.rooms.lock();
        if let Some(r) = rooms.get_mut(room) {
            if let Some(old) = r.by_client.remove(client) {
                dec(&mut r.users, &old.user);
            }
            if r.by_client.is_empty() {
                rooms.remove(room);
            }
        }
        Ok(())
    }

    async fn members(&self, room: &Room, limit: usize) -> Result<Option<Vec<Member>>, Infallible> {
        let rooms = self.rooms.lock();
        let Some(r) = rooms.get(room) else {
            return Ok(Some(Vec::new()));
        };
        if r.by_client.len() > limit {
            return Ok(None);
        }
        let mut v: Vec<Member> = r.by_client.values().cloned().collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(Some(v))
    }

    async fn stats(&self, room: &Room) -> Result<PresenceStats, Infallible> {
        let rooms = self.rooms.lock();
        Ok(rooms.get(room).map_or_else(PresenceStats::default, |r| PresenceStats {
            clients: r.by_client.len() as u64,
            users: r.users.len() as u64,
        }))
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), Infallible> {
        *self.node.lock() = Some((node.clone(), Instant::now()));
        Ok(())
    }

    async fn nodes(&self, timeout: Duration) -> Result<Vec<NodeInfo>, Infallible> {
        Ok(self
            .node
            .lock()
            .iter()
            .filter(|(_, at)| at.elapsed() <= timeout)
            .map(|(n, _)| n.clone())
            .collect())
    }

    async fn reap(&self, _timeout: Duration) -> Result<Vec<Reaped>, Infallible> {
        Ok(Vec::new())
    }

    async fn deregister(&self) -> Result<(), Infallible> {
        *self.node.lock() = None;
        Ok(())
    }
}

fn dec(users: &mut HashMap<String, u32>, user: &str) {
    if let Some(n) = users.get_mut(user) {
        *n -= 1;
        if *n == 0 {
            users.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn m(client: &str, user: &str) -> Member {
        Member { client: client.into(), user: user.into(), info: None, room_info: None }
    }

    #[tokio::test]
    async fn counts_clients_and_users() {
        let p = MemoryPresence::new();
        let r = Room::parse("a").unwrap();
        p.add(&r, &m("c1", "u1")).await.unwrap();
        p.add(&r, &m("c2", "u1")).await.unwrap();
        p.add(&r, &m("c3", "u2")).await.unwrap();
        p.add(&r, &m("c3", "u2")).await.unwrap();
        assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 3, users: 2 });
        assert_eq!(p.members(&r, 10).await.unwrap().unwrap().len(), 3);
        assert_eq!(p.members(&r, 2).await.unwrap(), None);
        p.remove(&r, "c1").await.unwrap();
        p.remove(&r, "nope").await.unwrap();
        assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 2, users: 2 });
        p.remove(&r, "c2").await.unwrap();
        p.remove(&r, "c3").await.unwrap();
        assert_eq!(p.room_count(), 0);
    }
}
