//! Per-thread buffer pools: a connection takes its buffers when a request starts and gives them
//! back when it goes idle, so an idle keep-alive connection holds none (as nginx frees its
//! request buffers in `ngx_http_set_keepalive`), and a busy one never allocates in steady state.
//!
//! Buffers are zero-filled once, when first allocated, and reused from then on: reads go into
//! initialised memory, so no `unsafe` is needed to track what a read filled.

use std::cell::RefCell;

/// Client-side buffer: the request head (kept in place for the whole request) and the request
/// body passing through behind it.
pub const CLIENT: usize = 16 * 1024;
/// Upstream-side buffer: the response head and the response body passing through.
pub const UPSTREAM: usize = 32 * 1024;
/// Scratch for a head tqproxy writes (the edited request or response head).
pub const SCRATCH: usize = 4 * 1024;
/// Free buffers kept per thread and class; beyond that they are freed. Enough for the requests
/// in flight on a busy thread (HTTP/2: 16 connections x 10 streams take 160 upstream buffers at
/// once; with 64 kept, every request past the 64th allocated and zeroed its 32 KiB: 5% of the
/// CPU, measured). Kept only once that many were in use at the same time.
const KEEP: usize = 256;

/// Free buffers of one class on this thread.
type FreeList = RefCell<Vec<Box<[u8]>>>;

thread_local! {
    static FREE_CLIENT: FreeList = const { RefCell::new(Vec::new()) };
    static FREE_UPSTREAM: FreeList = const { RefCell::new(Vec::new()) };
    static FREE_SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn pool_for(size: usize) -> Option<&'static std::thread::LocalKey<FreeList>> {
    match size {
        CLIENT => Some(&FREE_CLIENT),
        UPSTREAM => Some(&FREE_UPSTREAM),
        _ => None,
    }
}

/// A byte buffer with a filled window `data[start..end]`. Dropping it gives the storage back
/// to this thread's pool (buffers that grew past their class are freed instead).
pub struct Buf {
    data: Box<[u8]>,
    pub start: usize,
    pub end: usize,
}

impl Buf {
    /// A buffer of one of the classes above (`CLIENT` or `UPSTREAM`).
    pub fn take(size: usize) -> Buf {
        let data = pool_for(size)
            .and_then(|p| p.with_borrow_mut(|v| v.pop()))
            .unwrap_or_else(|| vec![0u8; size].into_boxed_slice());
        Buf {
            data,
            start: 0,
            end: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// The filled bytes.
    #[inline]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Room to read into, after the filled bytes.
    #[inline]
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.end..]
    }

    /// `n` more bytes were read into [`Self::spare`].
    #[inline]
    pub fn filled_by(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Drops `n` bytes from the front of the filled window.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Moves the filled bytes to the front, making the whole rest spare.
    pub fn compact(&mut self) {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Makes sure there is room for at least `min_spare` more bytes (compacting, then growing
    /// into a larger, unpooled buffer: only oversized heads need that).
    pub fn reserve(&mut self, min_spare: usize) {
        if self.data.len() - self.end >= min_spare {
            return;
        }
        self.compact();
        if self.data.len() - self.end >= min_spare {
            return;
        }
        let mut bigger = vec![0u8; (self.end + min_spare).next_power_of_two()].into_boxed_slice();
        bigger[..self.end].copy_from_slice(&self.data[..self.end]);
        let old = std::mem::replace(&mut self.data, bigger);
        give_back(old);
    }
}

fn give_back(data: Box<[u8]>) {
    if let Some(pool) = pool_for(data.len()) {
        // `try_with`: a buffer dropped while the thread's locals are being torn down is freed.
        let _ = pool.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEEP {
                p.push(data);
            }
        });
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.data));
    }
}

/// A growable scratch vector for writing heads, from this thread's pool.
pub struct Scratch(pub Vec<u8>);

impl Scratch {
    pub fn take() -> Scratch {
        let v = FREE_SCRATCH
            .with_borrow_mut(|v| v.pop())
            .unwrap_or_else(|| Vec::with_capacity(SCRATCH));
        Scratch(v)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() > 4 * SCRATCH {
            return; // an oversized head: free it rather than keep it
        }
        v.clear();
        let _ = FREE_SCRATCH.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEEP {
                p.push(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_windows_behave() {
        let mut b = Buf::take(CLIENT);
        assert_eq!(b.capacity(), CLIENT);
        b.spare()[..5].copy_from_slice(b"hello");
        b.filled_by(5);
        assert_eq!(b.filled(), b"hello");
        b.consume(2);
        assert_eq!(b.filled(), b"llo");
        b.compact();
        assert_eq!((b.start, b.end), (0, 3));
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!((b.start, b.end), (0, 0));
        let ptr = b.data.as_ptr();
        drop(b);
        let again = Buf::take(CLIENT);
        assert_eq!(again.data.as_ptr(), ptr, "the same storage comes back");
    }

    #[test]
    fn reserve_grows_past_the_class_and_keeps_bytes() {
        let mut b = Buf::take(CLIENT);
        b.spare().fill(b'x');
        b.filled_by(CLIENT);
        b.consume(10);
        b.reserve(100);
        assert_eq!(b.len(), CLIENT - 10);
        assert!(b.spare().len() >= 100);
        assert!(b.filled().iter().all(|&c| c == b'x'));
    }
}
