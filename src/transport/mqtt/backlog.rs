//! Received messages waiting for a free slot, in arrival order, within a byte
//! budget. Brokers are asked for at most `queue` unacknowledged messages (MQTT 5
//! Receive Maximum) but not all obey (Mosquitto 2.0 sends its whole backlog); past
//! the budget the session defers messages instead, and memory stays bounded
//! whatever the broker does.

use std::collections::VecDeque;

pub struct Backlog<M> {
    items: VecDeque<(M, usize)>,
    bytes: usize,
    budget: usize,
}

impl<M> Backlog<M> {
    pub fn new(budget: usize) -> Backlog<M> {
        Backlog {
            items: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// Within the budget; one message always fits, so a single large one still flows.
    pub fn fits(&self, bytes: usize) -> bool {
        self.items.is_empty() || self.bytes + bytes <= self.budget
    }

    pub fn push(&mut self, message: M, bytes: usize) {
        self.bytes += bytes;
        self.items.push_back((message, bytes));
    }

    pub fn pop(&mut self) -> Option<M> {
        let (message, bytes) = self.items.pop_front()?;
        self.bytes -= bytes;
        Some(message)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Dropped unacknowledged: the broker delivers them again.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_within_the_budget() {
        let mut b = Backlog::new(10);
        assert!(b.fits(50), "one message always fits");
        b.push('a', 6);
        assert!(b.fits(4) && !b.fits(5));
        b.push('b', 4);
        assert_eq!((b.pop(), b.pop(), b.pop()), (Some('a'), Some('b'), None));
        assert!(b.fits(10));
    }
}
