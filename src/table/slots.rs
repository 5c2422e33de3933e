//! `Slots<T>`: a vector indexed by service slot whose copies share storage. Each table
//! generation (and each status snapshot) is the last one with a few slots changed: copying
//! a plain `Vec` of 1,000 `Arc`s for that costs 1,000 reference-count updates, each on a
//! cold cache line of its own (about 1 µs per existing service per publish, measured). Here
//! a copy shares every chunk of `CHUNK` slots, and a write copies only the chunk it
//! touches, so a publish costs what it changes plus one pointer per `CHUNK` slots.
//!
//! Not a crate (`im`, `rpds`): those are trees keyed for any length and pay a walk of
//! several levels per lookup; the accept path reads one slot per connection, and a two-
//! level array (one more pointer than a `Vec`) is all this needs.

use std::sync::Arc;

/// Slots per chunk: a write copies this many `Arc`s, a copy of the whole clones one `Arc`
/// per chunk (1,000 services: 32 chunks).
const CHUNK: usize = 32;

#[derive(Debug)]
pub struct Slots<T> {
    chunks: Vec<Arc<[T; CHUNK]>>,
}

impl<T> Clone for Slots<T> {
    /// Shares every chunk: one reference-count update per `CHUNK` slots.
    fn clone(&self) -> Slots<T> {
        Slots {
            chunks: self.chunks.clone(),
        }
    }
}

impl<T> Default for Slots<T> {
    fn default() -> Slots<T> {
        Slots { chunks: Vec::new() }
    }
}

impl<T: Clone + Default> Slots<T> {
    /// Sets slot `i`, growing to hold it; copies its chunk first if another copy shares it.
    pub fn set(&mut self, i: usize, value: T) {
        let c = i / CHUNK;
        while self.chunks.len() <= c {
            self.chunks
                .push(Arc::new(std::array::from_fn(|_| T::default())));
        }
        Arc::make_mut(&mut self.chunks[c])[i % CHUNK] = value;
    }
}

impl<T> Slots<T> {
    /// Slot `i`, if it is within the slots ever set (a slot never set holds the default).
    #[inline]
    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK).map(|c| &c[i % CHUNK])
    }

    /// Every slot in order, the never-set ones of the last chunk included.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// Whether two copies share chunk `i / CHUNK` (a test's check that a write copied only
    /// its own chunk).
    #[cfg(test)]
    fn shares_chunk_with(&self, other: &Slots<T>, i: usize) -> bool {
        match (self.chunks.get(i / CHUNK), other.chunks.get(i / CHUNK)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_copies_only_its_chunk_and_leaves_the_copy_as_it_was() {
        let mut a: Slots<Option<u32>> = Slots::default();
        for i in 0..100 {
            a.set(i, Some(i as u32));
        }
        let before = a.clone();
        a.set(40, Some(4000));
        assert_eq!(a.get(40), Some(&Some(4000)));
        assert_eq!(before.get(40), Some(&Some(40)));
        assert!(!a.shares_chunk_with(&before, 40));
        for i in [0, 31, 64, 99] {
            assert!(a.shares_chunk_with(&before, i), "slot {i}");
            assert_eq!(a.get(i), before.get(i));
        }
    }

    #[test]
    fn growing_fills_new_slots_with_the_default() {
        let mut a: Slots<Option<u32>> = Slots::default();
        assert_eq!(a.get(0), None);
        a.set(70, Some(7));
        assert_eq!(a.get(69), Some(&None));
        assert_eq!(a.get(70), Some(&Some(7)));
        assert_eq!(a.get(3 * CHUNK), None);
        let set: Vec<usize> = a
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|_| i))
            .collect();
        assert_eq!(set, vec![70]);
        a.set(70, None);
        assert!(a.iter().all(Option::is_none));
    }
}
