//! Decompressed frames of run files (version 3), shared by every query of the process.
//!
//! A dashboard asks for the same series at every refresh, and a frame costs two reads, a
//! checksum and a zstd decompression; a sparse query (500 of 100,000 series) decompresses 16
//! series' runs (64 in a series index) for every series it reads. Keeping recent frames makes the repeated query skip
//! all of that.
//!
//! Two generations, like VictoriaMetrics's working-set cache: frames read or used go to the
//! current one; once it holds half the budget it becomes the previous one, and the previous
//! one is dropped. A frame used within the last two generations stays, and the cache never
//! holds much more than its budget. Keys are a run file's process-unique id and the frame's
//! offset, so the frames of a removed block are never found again and age out.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

/// Bytes of decompressed frames kept by the process.
pub(super) const BUDGET: usize = 32 << 20;

type Key = (u64, u64);

#[derive(Default)]
struct Generations {
    current: FxHashMap<Key, Arc<[u8]>>,
    current_bytes: usize,
    previous: FxHashMap<Key, Arc<[u8]>>,
}

pub(super) struct FrameCache {
    budget: usize,
    generations: Mutex<Generations>,
}

static FRAMES: LazyLock<FrameCache> = LazyLock::new(|| FrameCache::new(BUDGET));
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// The process's cache.
pub(super) fn shared() -> &'static FrameCache {
    &FRAMES
}

/// An id no other run file of this process has.
pub(super) fn file_id() -> u64 {
    NEXT_FILE.fetch_add(1, Ordering::Relaxed)
}

impl FrameCache {
    pub(super) fn new(budget: usize) -> FrameCache {
        FrameCache {
            budget,
            generations: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self, file: u64, offset: u64) -> Option<Arc<[u8]>> {
        let mut g = self.lock();
        if let Some(frame) = g.current.get(&(file, offset)) {
            return Some(frame.clone());
        }
        let frame = g.previous.remove(&(file, offset))?;
        self.keep(&mut g, (file, offset), frame.clone());
        Some(frame)
    }

    /// The frame if it is cached, leaving the cache as it is (a reader that must not decide
    /// what stays, such as compaction).
    pub(super) fn peek(&self, file: u64, offset: u64) -> Option<Arc<[u8]>> {
        let g = self.lock();
        g.current
            .get(&(file, offset))
            .or_else(|| g.previous.get(&(file, offset)))
            .cloned()
    }

    /// Drops the frames of a run file that is closed (its block removed or replaced).
    pub(super) fn forget(&self, file: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        g.current.retain(|key, frame| {
            let keep = key.0 != file;
            if !keep {
                g.current_bytes -= frame.len();
            }
            keep
        });
        g.previous.retain(|key, _| key.0 != file);
    }

    pub(super) fn insert(&self, file: u64, offset: u64, frame: Arc<[u8]>) {
        // A frame over a sixteenth of the budget is not kept: it would push out many small ones.
        if frame.len() <= self.budget / 16 {
            self.keep(&mut self.lock(), (file, offset), frame);
        }
    }

    fn keep(&self, g: &mut Generations, key: Key, frame: Arc<[u8]>) {
        g.current_bytes += frame.len();
        if let Some(replaced) = g.current.insert(key, frame) {
            g.current_bytes -= replaced.len();
        }
        if g.current_bytes > self.budget / 2 {
            g.previous = std::mem::take(&mut g.current);
            g.current_bytes = 0;
        }
    }

    /// Whether the current generation's byte count is the size of its frames.
    #[cfg(test)]
    fn counts_what_it_holds(&self) -> bool {
        let g = self.lock();
        g.current_bytes == g.current.values().map(|f| f.len()).sum::<usize>()
    }

    /// Bytes held in both generations.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let g = self.lock();
        g.current
            .values()
            .chain(g.previous.values())
            .map(|f| f.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, fill: u8) -> Arc<[u8]> {
        vec![fill; len].into()
    }

    #[test]
    fn frames_used_within_two_generations_stay_and_the_budget_holds() {
        let cache = FrameCache::new(1000);
        cache.insert(1, 0, frame(50, 1));
        assert_eq!(cache.get(1, 0).as_deref(), Some(&[1u8; 50][..]));
        assert!(cache.get(1, 50).is_none() && cache.get(2, 0).is_none());
        // Fill past half the budget: frame (1, 0) moves to the previous generation...
        for offset in 1..=10 {
            cache.insert(1, offset * 100, frame(50, 2));
        }
        // ...where a use brings it back to the current one.
        assert!(cache.get(1, 0).is_some());
        for offset in 11..=30 {
            cache.insert(1, offset * 100, frame(50, 3));
            assert!(cache.bytes() <= 1000 + 50, "{}", cache.bytes());
            assert!(cache.counts_what_it_holds());
        }
        // Not used for two generations: gone.
        assert!(cache.get(1, 100).is_none());
        assert!(cache.get(1, 3000).is_some());
        // Too big to keep.
        cache.insert(9, 0, frame(100, 4));
        assert!(cache.get(9, 0).is_none());
    }

    #[test]
    fn peeking_moves_nothing_and_a_closed_file_leaves() {
        let cache = FrameCache::new(1000);
        cache.insert(1, 0, frame(50, 1));
        for offset in 1..=10 {
            cache.insert(2, offset, frame(50, 2));
        }
        // (1, 0) went to the previous generation with the tenth frame; a peek finds it and
        // leaves it there, so the next rotation drops it.
        assert!(cache.peek(1, 0).is_some());
        for offset in 11..=20 {
            cache.insert(2, offset, frame(50, 2));
        }
        cache.insert(3, 0, frame(60, 3));
        assert!(cache.peek(1, 0).is_none());
        for offset in 21..=25 {
            cache.insert(2, offset, frame(50, 2));
        }
        cache.forget(2);
        assert_eq!(cache.bytes(), 60);
        assert!(cache.get(2, 25).is_none() && cache.get(3, 0).is_some());
        assert!(cache.counts_what_it_holds());
    }

    #[test]
    fn file_ids_are_unique() {
        let a = file_id();
        let b = file_id();
        assert_ne!(a, b);
    }
}
