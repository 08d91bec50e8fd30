//! Exactly once per offset, for one subscription (spec section 4). Pure logic, no I/O.
//!
//! The tracker knows the last delivered position `{offset, epoch}`. A publication at the
//! next offset is delivered; one at or below it is a duplicate and dropped; one beyond it
//! is a gap: nothing past a gap is delivered, the subscription is re-made with `recover`
//! from the last delivered offset instead ([`Step::resync`]). The offsets our own
//! `skip_self` publications got in their `published` replies count as seen. Pushes and
//! replies can cross (another client's later publication may be pushed before our own
//! `published` reply arrives), so while such a publish is in flight a publication past a
//! hole is held back, not treated as a gap yet.
//!
//! Publications carry no epoch: a new epoch is only seen in `subscribed` and `published`
//! replies. A live publication at offset 1 when we are past 1 can only be a duplicate or
//! the first of a new epoch, so the node is asked (resync) rather than guessing.

use std::collections::{BTreeMap, BTreeSet};

use roomcast_protocol::{Position, Publication};

/// Most publications held back waiting for our own `published` replies.
pub(crate) const MAX_HELD: usize = 256;
/// Most of our own `skip_self` offsets remembered ahead of the last delivered one.
pub(crate) const MAX_SELF_SEEN: usize = 1024;

/// What to do after an input: deliver these publications in this order, then, if
/// `resync`, re-make the subscription with `recover` from [`Tracker::position`].
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Step {
    pub deliver: Vec<Publication>,
    pub resync: bool,
}

impl Step {
    fn resync() -> Self {
        Step { deliver: Vec::new(), resync: true }
    }
}

/// Delivery state of one subscription.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Last delivered (or seen) position. `None` in rooms without history, and before the
    /// first `subscribed` unless the application gave a position to recover from.
    pos: Option<Position>,
    /// Offsets of our own `skip_self` publications past `pos`, in its epoch.
    self_seen: BTreeSet<u64>,
    /// Publications past a hole, held while a `skip_self` publish of ours may fill it.
    held: BTreeMap<u64, Publication>,
    /// `skip_self` publishes to this room whose reply has not come yet.
    inflight_self: usize,
}

impl Tracker {
    pub(crate) fn new(pos: Option<Position>) -> Self {
        Tracker { pos, ..Tracker::default() }
    }

    /// The last delivered position: where a `recover` starts.
    pub(crate) fn position(&self) -> Option<&Position> {
        self.pos.as_ref()
    }

    /// Starts over at `pos` (a fresh or unrecovered subscription, or a new epoch).
    pub(crate) fn reset(&mut self, pos: Option<Position>) {
        self.pos = pos;
        self.self_seen.clear();
        self.held.clear();
    }

    /// Forgets held publications: a resubscribe with `recover` will bring them again.
    pub(crate) fn drop_held(&mut self) {
        self.held.clear();
    }

    /// A live `publication` push.
    pub(crate) fn on_publication(&mut self, p: Publication) -> Step {
        let (Some(off), Some(pos)) = (p.offset, self.pos.as_mut()) else {
            // No history in this room (or no position to compare with): nothing to check.
            return Step { deliver: vec![p], resync: false };
        };
        if off <= pos.offset {
            if off == 1 {
                // Offsets restart at 1 in a new epoch: let the node say which it is.
                return Step::resync();
            }
            return Step::default();
        }
        let mut step = Step::default();
        if off == pos.offset + 1 {
            pos.offset = off;
            step.deliver.push(p);
            self.advance(&mut step);
            return step;
        }
        if self.inflight_self > 0 && self.held.len() < MAX_HELD {
            self.held.insert(off, p);
            return step;
        }
        Step::resync()
    }

    /// A `skip_self` publish to this room was sent.
    pub(crate) fn self_publish_started(&mut self) {
        self.inflight_self += 1;
    }

    /// A `skip_self` publish to this room got its reply: `pos` is the position from the
    /// `published` reply (`None` when it failed, was lost, or the room has no history).
    pub(crate) fn self_publish_done(&mut self, published: Option<Position>) -> Step {
        self.inflight_self = self.inflight_self.saturating_sub(1);
        let mut step = Step::default();
        if let (Some(p), Some(cur)) = (published, self.pos.as_ref()) {
            if p.epoch != cur.epoch {
                return Step::resync();
            }
            if p.offset > cur.offset {
                if self.self_seen.len() >= MAX_SELF_SEEN {
                    return Step::resync();
                }
                self.self_seen.insert(p.offset);
                self.advance(&mut step);
            }
        }
        if self.inflight_self == 0 && !self.held.is_empty() {
            // Nothing of ours can fill the hole any more: it is a real gap.
            step.resync = true;
        }
        step
    }

    /// A `subscribed` reply with `recovered: true`: `pubs` are the publications after the
    /// recover position, `end` the position the reply gives (live pushes continue after
    /// it).
    pub(crate) fn on_recovered(&mut self, pubs: Vec<Publication>, end: Option<Position>) -> Step {
        self.held.clear();
        let mut step = Step::default();
        for p in pubs {
            if let (Some(off), Some(pos)) = (p.offset, self.pos.as_mut()) {
                if off <= pos.offset {
                    continue;
                }
                if off != pos.offset + 1 {
                    tracing::warn!(room = %p.room, offset = off, last = pos.offset, "hole in recovered publications");
                }
                pos.offset = off;
            }
            step.deliver.push(p);
        }
        if let Some(end) = end {
            match self.pos.as_mut() {
                Some(pos) if pos.epoch == end.epoch => pos.offset = pos.offset.max(end.offset),
                _ => self.pos = Some(end),
            }
        }
        self.advance(&mut step);
        step
    }

    /// The publication at `offset` (and everything after it in the same step) could not
    /// be handed to the application: the last delivered offset is the one before it.
    pub(crate) fn undelivered(&mut self, offset: u64) {
        if let Some(pos) = self.pos.as_mut() {
            pos.offset = pos.offset.min(offset.saturating_sub(1));
        }
        self.held.clear();
    }

    /// Moves past our own offsets and releases held publications that became contiguous.
    fn advance(&mut self, step: &mut Step) {
        let Some(pos) = self.pos.as_mut() else {
            return;
        };
        loop {
            let next = pos.offset + 1;
            if self.self_seen.remove(&next) {
                pos.offset = next;
            } else if let Some(p) = self.held.remove(&next) {
                pos.offset = next;
                step.deliver.push(p);
            } else {
                break;
            }
        }
        let last = pos.offset;
        self.self_seen.retain(|o| *o > last);
        self.held.retain(|o, _| *o > last);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use roomcast_protocol::Data;

    fn p(offset: u64) -> Publication {
        Publication {
            room: "r".into(),
            offset: Some(offset),
            data: Data::from_json(offset.to_string()).unwrap(),
            info: None,
        }
    }
    fn pos(offset: u64, epoch: &str) -> Position {
        Position { offset, epoch: epoch.into() }
    }
    fn offsets(s: &Step) -> Vec<u64> {
        s.deliver.iter().map(|p| p.offset.unwrap()).collect()
    }

    #[test]
    fn in_order_is_delivered_and_duplicates_dropped() {
        let mut t = Tracker::new(Some(pos(0, "e")));
        assert_eq!(offsets(&t.on_publication(p(1))), [1]);
        assert_eq!(offsets(&t.on_publication(p(2))), [2]);
        let dup = t.on_publication(p(2));
        assert_eq!(dup, Step::default());
        assert_eq!(t.on_publication(p(3)).deliver.len(), 1);
        assert_eq!(t.position(), Some(&pos(3, "e")));
    }

    #[test]
    fn gap_asks_for_resync_and_delivers_nothing_past_it() {
        let mut t = Tracker::new(Some(pos(5, "e")));
        let s = t.on_publication(p(7));
        assert!(s.resync);
        assert!(s.deliver.is_empty());
        assert_eq!(t.position(), Some(&pos(5, "e")));
    }

    #[test]
    fn restart_at_one_asks_the_node() {
        let mut t = Tracker::new(Some(pos(9, "e")));
        assert!(t.on_publication(p(1)).resync);
        // Offset 1 is normal right after offset 0.
        let mut t = Tracker::new(Some(pos(0, "e")));
        assert_eq!(offsets(&t.on_publication(p(1))), [1]);
    }

    #[test]
    fn rooms_without_history_deliver_everything() {
        let mut t = Tracker::new(None);
        let mut q = p(1);
        q.offset = None;
        assert_eq!(t.on_publication(q.clone()).deliver, vec![q.clone()]);
        assert_eq!(t.on_publication(q.clone()).deliver, vec![q]);
        // Offsets without a known position cannot be checked either.
        assert_eq!(offsets(&t.on_publication(p(4))), [4]);
    }

    #[test]
    fn own_skip_self_offset_is_no_gap() {
        let mut t = Tracker::new(Some(pos(1, "e")));
        t.self_publish_started();
        let s = t.self_publish_done(Some(pos(2, "e")));
        assert_eq!(s, Step::default());
        assert_eq!(t.position(), Some(&pos(2, "e")));
        assert_eq!(offsets(&t.on_publication(p(3))), [3]);
    }

    #[test]
    fn own_offset_ahead_of_pushes_is_remembered() {
        // Others published 2 and 3, ours is 4; our reply arrives before their pushes.
        let mut t = Tracker::new(Some(pos(1, "e")));
        t.self_publish_started();
        assert_eq!(t.self_publish_done(Some(pos(4, "e"))), Step::default());
        assert_eq!(offsets(&t.on_publication(p(2))), [2]);
        assert_eq!(offsets(&t.on_publication(p(3))), [3]);
        assert_eq!(t.position(), Some(&pos(4, "e")));
        assert_eq!(offsets(&t.on_publication(p(5))), [5]);
    }

    #[test]
    fn push_past_own_inflight_publish_is_held_until_the_reply() {
        let mut t = Tracker::new(Some(pos(1, "e")));
        t.self_publish_started();
        // Ours will be 2; another client's 3 is pushed before our reply.
        assert_eq!(t.on_publication(p(3)), Step::default());
        let s = t.self_publish_done(Some(pos(2, "e")));
        assert_eq!(offsets(&s), [3]);
        assert!(!s.resync);
        assert_eq!(t.position(), Some(&pos(3, "e")));
    }

    #[test]
    fn held_hole_not_filled_by_our_reply_is_a_gap() {
        let mut t = Tracker::new(Some(pos(1, "e")));
        t.self_publish_started();
        assert_eq!(t.on_publication(p(4)), Step::default());
        // Ours was 2: 3 is missing for real.
        let s = t.self_publish_done(Some(pos(2, "e")));
        assert!(s.deliver.is_empty());
        assert!(s.resync);
        assert_eq!(t.position(), Some(&pos(2, "e")));
        // A failed publish also ends the wait.
        let mut t = Tracker::new(Some(pos(1, "e")));
        t.self_publish_started();
        assert_eq!(t.on_publication(p(3)), Step::default());
        assert!(t.self_publish_done(None).resync);
    }

    #[test]
    fn published_in_another_epoch_asks_the_node() {
        let mut t = Tracker::new(Some(pos(8, "e")));
        t.self_publish_started();
        assert!(t.self_publish_done(Some(pos(1, "f"))).resync);
    }

    #[test]
    fn recovery_drops_what_was_delivered_and_continues_after_the_reply_position() {
        let mut t = Tracker::new(Some(pos(3, "e")));
        let s = t.on_recovered(vec![p(2), p(3), p(4), p(5)], Some(pos(5, "e")));
        assert_eq!(offsets(&s), [4, 5]);
        assert!(!s.resync);
        assert_eq!(offsets(&t.on_publication(p(5))), Vec::<u64>::new());
        assert_eq!(offsets(&t.on_publication(p(6))), [6]);
    }

    #[test]
    fn epoch_change_resets() {
        let mut t = Tracker::new(Some(pos(30, "e")));
        t.reset(Some(pos(2, "f")));
        assert_eq!(offsets(&t.on_publication(p(3))), [3]);
        assert_eq!(t.position(), Some(&pos(3, "f")));
    }

    #[test]
    fn undelivered_rewinds_to_the_last_handed_over() {
        let mut t = Tracker::new(Some(pos(0, "e")));
        let s = t.on_recovered(vec![p(1), p(2), p(3)], Some(pos(3, "e")));
        assert_eq!(offsets(&s), [1, 2, 3]);
        t.undelivered(2);
        assert_eq!(t.position(), Some(&pos(1, "e")));
    }

    #[test]
    fn held_is_bounded() {
        let mut t = Tracker::new(Some(pos(0, "e")));
        t.self_publish_started();
        for o in 0..MAX_HELD as u64 {
            assert_eq!(t.on_publication(p(10 + o)), Step::default());
        }
        assert!(t.on_publication(p(10_000)).resync);
    }
}
